"""What the MLproject entry points share: argument types, the analysis arguments, and the run wrapper.

Each entry point builds its parser from the option declarations (`parser_for` / `analysis_parser`, via
`sae_mlops.options.add_arguments`) and makes one library call through `run` / `guarded`. An empty
string means "not given" (the MLproject defaults are empty for optional values), so the library's own
defaults apply. A missing package is reported in one sentence instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def _import_error(e: ImportError) -> None:
    sys.stderr.write(
        f"Error: {sys.executable} cannot import sae_mlops ({e}); activate the project's virtualenv "
        "(source .venv/bin/activate) before 'mlflow run ... --env-manager local', or use --env-manager virtualenv.\n"
    )
    sys.exit(2)


try:  # argparse types shared with the generated parsers
    from sae_mlops.options import boolean, choice, opt, whole  # noqa: F401 (re-exported to the entry points)
except ImportError as _e:  # pragma: no cover - the package is installed in every test run
    _import_error(_e)


def parser_for(prog: str, description: str, *classes: type) -> argparse.ArgumentParser:
    """A parser with one ``--flag VALUE`` per option of each configuration class (generated from the
    declarations in `sae_mlops.config` / `sae_mlops.training.config`) and ``--verbose``."""
    from sae_mlops.options import add_arguments

    p = argparse.ArgumentParser(prog=prog, description=description)
    for cls in classes:
        add_arguments(p, cls)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def analysis_parser(kind: str, description: str, *extra: type) -> argparse.ArgumentParser:
    """The parser of an analysis entry point: every `AnalysisConfig` option, the options of each class
    in `extra` (e.g. `FullOptions`), the `ExecutionOptions` (shards, local or Ray), then ``--out``."""
    from sae_mlops.config import AnalysisConfig, ExecutionOptions, RunOptions

    return parser_for(f"entrypoints/{kind}.py", description, AnalysisConfig, *extra, ExecutionOptions, RunOptions)


def guarded(args: argparse.Namespace, body: Callable[[], int | None], errors: dict[type, int] | None = None) -> int:
    """Set up logging and run ``body()``; a user mistake (InputError, or a type in ``errors``), a
    tracking failure (TrackingError) or Ctrl-C (Interrupted) becomes one line on stderr and its exit
    code (2, 2, 130). Says what to do when sae_mlops is missing."""
    try:
        from sae_mlops.errors import InputError, Interrupted, TrackingError
        from sae_mlops.logging_setup import setup_logging
    except ImportError as e:  # pragma: no cover - reported at import time already
        _import_error(e)
    setup_logging(verbose=args.verbose)
    codes = {InputError: 2, TrackingError: 2, Interrupted: 130, **(errors or {})}
    try:
        return body() or 0
    except tuple(codes) as e:
        from sae_mlops.redact import redact

        sys.stderr.write("Error: " + " ".join(redact(e).split()) + "\n")
        return getattr(e, "exit_code", None) or next(c for t, c in codes.items() if isinstance(e, t))


def run(args: argparse.Namespace, call: Callable[[Any, argparse.Namespace], Any]) -> int:
    """Build the AnalysisConfig from `args`, then `call(cfg, args)` (through :func:`guarded`)."""

    def body() -> None:
        from sae_mlops.config import AnalysisConfig
        from sae_mlops.options import build

        call(build(AnalysisConfig, vars(args)), args)

    return guarded(args, body)
