"""MLproject entry point ``train``: parse the -P parameters and make one library call.

``mlflow run . -e train [-P architecture=topk -P d_sae=512 -P register=my-sae -P alias=champion]``
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

from _common import boolean, choice, given, guarded, opt, whole  # noqa: E402

# argparse dest -> TrainConfig field (the rest: out, register, alias, verbose)
TRAIN_FIELDS = (
    "model", "corpus", "text_field", "hook", "architecture", "d_sae", "k", "l1_coefficient", "lr",
    "training_tokens", "batch_size_tokens", "context_size", "prepend_bos", "dead_feature_window", "seed",
    "device", "dtype",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entrypoints/train.py", description="Train an SAE with SAELens, tracked in MLflow (the MLproject 'train' entry point).")
    p.add_argument("--model", type=opt(str), default=None, help="TransformerLens name, HF checkpoint dir or 'demo' (empty: demo)")
    p.add_argument("--corpus", type=opt(str), default=None, help="JSON/JSONL/Parquet/text file (empty: demo corpus with the demo model)")
    p.add_argument("--text-field", type=opt(str), default=None, help="JSONL field / Parquet column (empty: text)")
    p.add_argument("--hook", type=opt(str), default=None, help="hook to train on (empty: the demo hook with the demo model)")
    p.add_argument("--architecture", type=opt(choice("standard", "topk", "batchtopk", "jumprelu")), default=None, help="empty: topk")
    p.add_argument("--d-sae", type=opt(whole), default=None, help="dictionary size (empty: 8 x the hook width)")
    p.add_argument("--k", type=opt(whole), default=None, help="active features per token for topk/batchtopk (empty: 16)")
    p.add_argument("--l1-coefficient", type=opt(float), default=None, help="L1 (standard) / L0 (jumprelu) coefficient (empty: 5.0 / 1.0)")
    p.add_argument("--lr", type=opt(float), default=None, help="learning rate (empty: 3e-3)")
    p.add_argument("--training-tokens", type=opt(whole), default=None, help="tokens to train on (empty: 300000)")
    p.add_argument("--batch-size-tokens", type=opt(whole), default=None, help="tokens per step (empty: 1024)")
    p.add_argument("--context-size", type=opt(whole), default=None, help="tokens per window (empty: min(128, n_ctx))")
    p.add_argument("--prepend-bos", type=opt(boolean), default=None, help="true/false (empty: the model's default)")
    p.add_argument("--dead-feature-window", type=opt(whole), default=None, help="steps without firing = dead (empty: 100)")
    p.add_argument("--seed", type=opt(whole), default=None, help="random seed (empty: 42)")
    p.add_argument("--device", type=opt(str), default=None, help="auto, cpu, cuda... (empty: auto)")
    p.add_argument("--dtype", type=opt(str), default=None, help="float32, bfloat16... (empty: float32)")
    p.add_argument("--out", type=opt(str), default=None, help="where to save the SAE (empty: saes/<arch>_<d_sae>_<ts>)")
    p.add_argument("--register", type=opt(str), default=None, help="registered model name (empty: not registered)")
    p.add_argument("--alias", type=opt(str), default=None, help="alias for the registered version (empty: none)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from sae_mlops.training import TrainConfig, train_and_log

        cfg = TrainConfig(**given(args, TRAIN_FIELDS))
        outcome = train_and_log(cfg, args.out, register=args.register, alias=args.alias)
        sys.stdout.write(f"training run {outcome.run_id}; logged model {outcome.model_id}; analyse with --sae {outcome.model_uri}\n")

    return guarded(args, body)


if __name__ == "__main__":
    sys.exit(main())
