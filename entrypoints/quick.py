"""MLproject entry point ``quick``: parse the -P parameters and make one library call.

``mlflow run . -e quick -P sae=PATH_OR_URI [-P model=demo ...]`` runs this file inside the MLflow run
it created (``MLFLOW_RUN_ID``); `sae_mlops.workflows.run_quick_and_log` then logs into that run.
An empty string means "not given" (the MLproject defaults are empty for optional values), so the
library's own defaults apply. A user mistake exits with code 2 and one sentence on stderr.
The arguments are shared with the other entry points (`_common.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return _common.analysis_parser("quick", "Quick SAE analysis tracked in MLflow (the MLproject 'quick' entry point).")


def _call(cfg, args: argparse.Namespace) -> None:
    from sae_mlops.config import ExecutionOptions
    from sae_mlops.options import build
    from sae_mlops.workflows import run_quick_and_log

    run_quick_and_log(cfg, args.out, track=True, exec_opts=build(ExecutionOptions, vars(args)))


def main(argv: list[str] | None = None) -> int:
    return _common.run(build_parser().parse_args(argv), _call)


if __name__ == "__main__":
    sys.exit(main())
