"""MLproject entry point ``synth``: parse the -P parameters and make one library call.

``mlflow run . -e synth [-P features=256 -P widths=256,512 -P executor=ray]`` builds (or reuses) a
synthetic world, trains and scores the grid of recipes inside the MLflow run that ``mlflow run``
created (the grid run; one child training run per recipe) with
`sae_mlops.training.synth.synth_and_log`. An empty string means "not given". A user mistake exits
with code 2 and one sentence on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from sae_mlops.config import SynthConfig, SynthRunOptions

    return _common.parser_for(
        "entrypoints/synth.py",
        "Train a grid of SAE recipes on a synthetic world and score them against the truth (the MLproject 'synth' entry point).",
        SynthConfig,
        SynthRunOptions,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from sae_mlops.config import SynthConfig
        from sae_mlops.options import build
        from sae_mlops.training.synth import synth_and_log

        cfg = build(SynthConfig, vars(args))
        outcome = synth_and_log(cfg, args.out)
        sys.stdout.write(
            f"synth grid run {outcome.grid_run_id}: winner on MCC {outcome.facts['winner_mcc']}; "
            f"report {outcome.report / 'README.html'}\n"
        )

    return _common.guarded(args, body)


if __name__ == "__main__":
    sys.exit(main())
