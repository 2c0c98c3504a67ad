"""MLproject entry point ``train``: parse the -P parameters and make one library call.

``mlflow run . -e train [-P architecture=topk -P d_sae=512 -P register=my-sae -P alias=champion]``
(``-P seeds=4``: four seeds of the recipe as child runs of the run ``mlflow run`` created)
trains an SAE with SAELens (the demo model and corpus by default) inside the MLflow run that
``mlflow run`` created (``MLFLOW_RUN_ID``): `sae_mlops.training.train_and_log` logs the config,
per-step metrics, the SAE as artifacts and as a logged model, and registers it when asked. An empty
string means "not given" (the library default applies). A user mistake exits with code 2 and one
sentence on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from sae_mlops.training.config import TrainConfig, TrainRunOptions

    return _common.parser_for(
        "entrypoints/train.py",
        "Train an SAE with SAELens, tracked in MLflow (the MLproject 'train' entry point).",
        TrainConfig,
        TrainRunOptions,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from sae_mlops.options import build
        from sae_mlops.training import TrainConfig, train_and_log
        from sae_mlops.training.config import TrainRunOptions

        cfg = build(TrainConfig, vars(args))
        seeds = int(args.seeds or 1)
        if seeds > 1:  # the run mlflow created is the parent; each seed is a child run
            from sae_mlops.training import train_seeds_and_log

            build(TrainRunOptions, vars(args))  # --alias with --seeds > 1 is refused here
            many = train_seeds_and_log(cfg, seeds, args.out, register=args.register)
            sys.stdout.write(f"parent run {many.parent_run_id}: {seeds} seeds of recipe {many.recipe_hash}; child runs "
                             f"{', '.join(o.run_id for o in many.outcomes)}\n")
            return
        outcome = train_and_log(cfg, args.out, register=args.register, alias=args.alias)
        sys.stdout.write(f"training run {outcome.run_id}; logged model {outcome.model_id}; analyse with --sae {outcome.model_uri}\n")

    return _common.guarded(args, body)


if __name__ == "__main__":
    sys.exit(main())
