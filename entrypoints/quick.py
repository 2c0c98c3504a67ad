"""MLproject entry point ``quick``: parse the -P parameters and make one library call.

``mlflow run . -e quick -P sae=PATH_OR_URI [-P model=demo ...]`` runs this file inside the MLflow run
it created (``MLFLOW_RUN_ID``); `sae_mlops.pipeline.run_quick_and_log` then logs into that run.
An empty string means "not given" (the MLproject defaults are empty for optional values), so the
library's own defaults apply. A user mistake exits with code 2 and one sentence on stderr.
"""

from __future__ import annotations

import argparse
import sys


def _opt(cast):
    """An argparse type: '' -> None, else cast(value)."""

    def parse(value: str):
        value = value.strip()
        if value == "" or value.lower() == "none":
            return None
        return cast(value)

    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


def _int(value: str) -> int:
    f = float(value)  # accepts 1e6
    if not f.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(f)


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _topk(value: str) -> str:
    if value not in ("batch", "threshold"):
        raise argparse.ArgumentTypeError(f"expected batch or threshold, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="entrypoints/quick.py",
        description="Quick SAE analysis tracked in MLflow (the MLproject 'quick' entry point).",
    )
    p.add_argument("--sae", required=True, help="SAE directory, SAELens release, runs:/... or models:/... URI")
    p.add_argument("--sae-id", type=_opt(str), default=None, help="SAE id within a SAELens release")
    p.add_argument("--model", type=_opt(str), default=None, help="TransformerLens name, HF checkpoint dir or 'demo' (empty: as recorded in the SAE)")
    p.add_argument("--corpus", type=_opt(str), default=None, help="JSON/JSONL/Parquet/text file (empty: demo corpus with the demo model)")
    p.add_argument("--text-field", type=_opt(str), default=None, help="JSONL field / Parquet column (empty: text)")
    p.add_argument("--hook", type=_opt(str), default=None, help="hook name (empty: the SAE's hook)")
    p.add_argument("--max-tokens", type=_opt(_int), default=None, help="token budget (empty: 1000000)")
    p.add_argument("--context-size", type=_opt(_int), default=None, help="tokens per window (empty: the SAE's, else 128)")
    p.add_argument("--batch-size", type=_opt(_int), default=None, help="windows per batch (empty: 16)")
    p.add_argument("--prepend-bos", type=_opt(_bool), default=None, help="true/false (empty: as the SAE's metadata says)")
    p.add_argument("--topk-mode", type=_opt(_topk), default=None, help="batch or threshold (empty: batch)")
    p.add_argument("--threshold", type=_opt(float), default=None, help="theta for threshold mode (empty: estimated)")
    p.add_argument("--rare-threshold", type=_opt(float), default=None, help="rare below this firing fraction (empty: 1e-5)")
    p.add_argument("--dense-threshold", type=_opt(float), default=None, help="dense above this firing fraction (empty: 0.1)")
    p.add_argument("--device", type=_opt(str), default=None, help="auto, cpu, cuda... (empty: auto)")
    p.add_argument("--dtype", type=_opt(str), default=None, help="float32, float16, bfloat16 (empty: float32)")
    p.add_argument("--out", type=_opt(str), default=None, help="output directory (empty: analysis/<sae>/quick_<ts>)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from sae_mlops.config import AnalysisConfig
        from sae_mlops.errors import InputError
        from sae_mlops.logging_setup import setup_logging
        from sae_mlops.pipeline import run_quick_and_log
    except ImportError as e:
        sys.stderr.write(
            f"Error: {sys.executable} cannot import sae_mlops ({e}); activate the project's virtualenv "
            "(source .venv/bin/activate) before 'mlflow run ... --env-manager local', or use --env-manager virtualenv.\n"
        )
        return 2

    setup_logging(verbose=args.verbose)
    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("out", "verbose")
    }
    try:
        cfg = AnalysisConfig(**given)
        run_quick_and_log(cfg, args.out, track=True)
    except InputError as e:
        sys.stderr.write("Error: " + " ".join(str(e).split()) + "\n")
        return getattr(e, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
