"""User-facing errors.

`InputError` is raised for every mistake a user can fix (a missing file, a hook the model does not
have, an empty corpus...). Its message is one sentence naming the input and the fix. The CLI and the
entry points turn it into that sentence on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: the message names the input and how to fix it."""

    exit_code = 2


class AnalysisInterrupted(KeyboardInterrupt):
    """Ctrl-C during an analysis; the message says in one line what it left behind (complete files,
    the MLflow run). Still a KeyboardInterrupt for any caller that catches those. The CLI prints the
    message and exits with code 130."""

    exit_code = 130
