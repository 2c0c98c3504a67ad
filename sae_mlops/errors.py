"""User-facing errors.

`InputError` is raised for every mistake a user can fix (a missing file, a hook the model does not
have, an empty corpus...). Its message is one sentence naming the input and the fix. The CLI and the
entry points turn it into that sentence on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: the message names the input and how to fix it."""

    exit_code = 2


class DiskFull(InputError):
    """The disk under the output directory filled up (ENOSPC/EDQUOT) while results were written; the
    message says what was kept (the checkpoint) and how to continue once space is freed."""


class TrackingError(Exception):
    """The MLflow tracking store cannot be reached or refused what was logged.

    Not an `InputError` on purpose: the inputs are fine and a retry may succeed (the service retries
    it). The CLI still shows it as one sentence with exit code 2; the message says where the results
    are when the analysis had finished. The original exception is the ``__cause__``.
    """

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """The user interrupted (SIGINT) a command; the message says what was left behind.

    A `KeyboardInterrupt`, so code that lets interrupts through (``except Exception``) still does.
    The CLI shows the message as one line and exits with 130 (128 + SIGINT).
    """

    exit_code = 130


class AnalysisInterrupted(Interrupted):
    """Ctrl-C during an analysis; the message says in one line what it left behind (complete files,
    the MLflow run)."""

    exit_code = 130
