"""MLproject entry point ``probe``: parse the -P parameters and make one library call.

``mlflow run . -e probe -P sae=PATH_OR_URI [-P datasets=name=file.jsonl ...]`` probes the SAE inside
the MLflow run that ``mlflow run`` created (``MLFLOW_RUN_ID``; `sae_mlops.workflows.run_probe_and_log`
logs into it). An empty string means "not given". A user mistake exits with code 2 and one sentence.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from sae_mlops.config import EvalRunOptions, EvalTarget, ProbeOptions

    return _common.parser_for("entrypoints/probe.py", "k-sparse probing of an SAE, tracked in MLflow (the MLproject 'probe' entry point).",
                              EvalTarget, ProbeOptions, EvalRunOptions)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from sae_mlops.config import EvalRunOptions, EvalTarget, ProbeOptions
        from sae_mlops.options import build
        from sae_mlops.workflows import run_probe_and_log

        values = vars(args)
        outcome = run_probe_and_log(build(EvalTarget, values), build(ProbeOptions, values), build(EvalRunOptions, values))
        sys.stdout.write(f"probe run {outcome.run_id}; files under {outcome.out_dir}\n")

    return _common.guarded(args, body)


if __name__ == "__main__":
    sys.exit(main())
