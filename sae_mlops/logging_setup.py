"""Console logging for the CLI and the entry points (rich, on stderr).

Library modules only call ``logging.getLogger(__name__)``; the command-line layers call
:func:`setup_logging` once. ``--verbose`` shows debug messages from ``sae_mlops``; ``--quiet`` keeps
warnings and errors only. Third-party loggers (MLflow included, via ``MLFLOW_LOGGING_LEVEL`` unless the user set it) stay at
WARNING so their chatter does not drown ours.
"""

from __future__ import annotations

import logging
import os

from sae_mlops.redact import RedactingFilter

_NOISY = ("mlflow", "urllib3", "alembic", "git", "matplotlib", "filelock", "httpx", "huggingface_hub")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Route log records to a rich handler on stderr.

    verbose: DEBUG for ``sae_mlops`` (and INFO for third-party libraries).
    quiet: WARNING and above only (ignored when ``verbose`` is set).
    """
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    # MLflow configures its own loggers when imported (later, lazily), from this variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    handler = RichHandler(
        console=Console(stderr=True),
        show_path=verbose,
        show_time=verbose,
        rich_tracebacks=True,
        markup=False,
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter())  # credentials never reach the console
    root = logging.getLogger()
    # Replace handlers installed by an earlier call (tests call the CLI several times).
    for h in list(root.handlers):
        if getattr(h, "_sae_mlops", False):
            root.removeHandler(h)
    handler._sae_mlops = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("sae_mlops").setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)
