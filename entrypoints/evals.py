"""MLproject entry point ``evals``: parse the -P parameters and make one library call.

``mlflow run . -e evals -P sae=PATH_OR_URI -P suite=core,probe,absorption`` runs the suite inside the
MLflow run that ``mlflow run`` created (``MLFLOW_RUN_ID``: the core analysis and every eval log into
it). An empty string means "not given". A user mistake exits with code 2 and one sentence.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from sae_mlops.config import AbsorptionOptions, AnalysisConfig, AutointerpOptions, EvalRunOptions, EvalsOptions, ProbeOptions

    return _common.parser_for("entrypoints/evals.py", "A suite of evals on one SAE, logged to one MLflow run (the MLproject 'evals' entry point).",
                              AnalysisConfig, EvalsOptions, ProbeOptions, AbsorptionOptions, AutointerpOptions, EvalRunOptions)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from sae_mlops.config import AbsorptionOptions, AnalysisConfig, AutointerpOptions, EvalRunOptions, EvalsOptions, ProbeOptions
        from sae_mlops.options import build
        from sae_mlops.workflows import run_evals_and_log

        v = vars(args)
        outcome = run_evals_and_log(build(AnalysisConfig, v, progress=False), build(EvalsOptions, v), build(ProbeOptions, v),
                                    build(AbsorptionOptions, v), build(AutointerpOptions, v), build(EvalRunOptions, v))
        sys.stdout.write(f"evals run {outcome.run_id}; files under {outcome.out_dir}\n")

    return _common.guarded(args, body)


if __name__ == "__main__":
    sys.exit(main())
