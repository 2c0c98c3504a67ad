"""MLproject entry point ``full``: parse the -P parameters and make one library call.

``mlflow run . -e full -P sae=PATH_OR_URI [-P model=demo ...]`` takes every parameter of ``quick``
plus the full-analysis ones, runs `sae_mlops.workflows.run_full_and_log` inside the MLflow run that
``mlflow run`` created, and logs every output file as an artifact. An empty string means "not given"
(the library default applies). A user mistake exits with code 2 and one sentence on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from sae_mlops.config import FullOptions

    return _common.analysis_parser("full", "Full SAE analysis tracked in MLflow (the MLproject 'full' entry point).", FullOptions)


def _call(cfg, args: argparse.Namespace) -> None:
    from sae_mlops.config import ExecutionOptions, FullOptions
    from sae_mlops.options import build
    from sae_mlops.workflows import run_full_and_log

    run_full_and_log(cfg, args.out, opts=build(FullOptions, vars(args)), track=True,
                     exec_opts=build(ExecutionOptions, vars(args)))


def main(argv: list[str] | None = None) -> int:
    return _common.run(build_parser().parse_args(argv), _call)


if __name__ == "__main__":
    sys.exit(main())
