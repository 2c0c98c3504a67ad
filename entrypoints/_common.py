"""What the MLproject entry points share: argument types, the analysis arguments, and the run wrapper.

Each entry point (`quick.py`, `full.py`) builds its parser from `analysis_parser` and makes one
library call through `run`. An empty string means "not given" (the MLproject defaults are empty for
optional values), so the library's own defaults apply. Nothing here imports sae_mlops at import time,
so the parser works (and `run` can say what is wrong) when the package is not installed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def opt(cast):
    """An argparse type: '' -> None, else cast(value)."""

    def parse(value: str):
        value = value.strip()
        if value == "" or value.lower() == "none":
            return None
        return cast(value)

    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


def whole(value: str) -> int:
    f = float(value)  # accepts 1e6
    if not f.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(f)


def boolean(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def choice(*allowed: str):
    """An argparse type accepting one of `allowed`."""

    def parse(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"expected {' or '.join(allowed)}, got {value!r}")
        return value

    parse.__name__ = "|".join(allowed)
    return parse


def analysis_parser(kind: str, description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every analysis entry point takes (AnalysisConfig fields + out)."""
    p = argparse.ArgumentParser(prog=f"entrypoints/{kind}.py", description=description)
    p.add_argument("--sae", required=True, help="SAE directory, SAELens release, runs:/... or models:/... URI")
    p.add_argument("--sae-id", type=opt(str), default=None, help="SAE id within a SAELens release")
    p.add_argument("--model", type=opt(str), default=None, help="TransformerLens name, HF checkpoint dir or 'demo' (empty: as recorded in the SAE)")
    p.add_argument("--corpus", type=opt(str), default=None, help="JSON/JSONL/Parquet/text file (empty: demo corpus with the demo model)")
    p.add_argument("--text-field", type=opt(str), default=None, help="JSONL field / Parquet column (empty: text)")
    p.add_argument("--hook", type=opt(str), default=None, help="hook name (empty: the SAE's hook)")
    p.add_argument("--max-tokens", type=opt(whole), default=None, help="token budget (empty: 1000000)")
    p.add_argument("--context-size", type=opt(whole), default=None, help="tokens per window (empty: the SAE's, else 128)")
    p.add_argument("--batch-size", type=opt(whole), default=None, help="windows per batch (empty: 16)")
    p.add_argument("--prepend-bos", type=opt(boolean), default=None, help="true/false (empty: as the SAE's metadata says)")
    p.add_argument("--topk-mode", type=opt(choice("batch", "threshold")), default=None, help="batch or threshold (empty: batch)")
    p.add_argument("--threshold", type=opt(float), default=None, help="theta for threshold mode (empty: estimated)")
    p.add_argument("--rare-threshold", type=opt(float), default=None, help="rare below this firing fraction (empty: 1e-5)")
    p.add_argument("--dense-threshold", type=opt(float), default=None, help="dense above this firing fraction (empty: 0.1)")
    p.add_argument("--device", type=opt(str), default=None, help="auto, cpu, cuda... (empty: auto)")
    p.add_argument("--dtype", type=opt(str), default=None, help="float32, float16, bfloat16 (empty: float32)")
    p.add_argument("--out", type=opt(str), default=None, help=f"output directory (empty: analysis/<sae>/{kind}_<ts>)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def given(args: argparse.Namespace, names) -> dict[str, Any]:
    """The arguments among `names` that were given (not None)."""
    return {k: v for k, v in vars(args).items() if v is not None and k in names}


def guarded(args: argparse.Namespace, body: Callable[[], int | None], errors: dict[type, int] | None = None) -> int:
    """Set up logging and run ``body()``; a user mistake (InputError, or a type in ``errors``), a
    tracking failure (TrackingError) or Ctrl-C (Interrupted) becomes one line on stderr and its exit
    code (2, 2, 130). Says what to do when sae_mlops is missing."""
    try:
        from sae_mlops.errors import InputError, Interrupted, TrackingError
        from sae_mlops.logging_setup import setup_logging
    except ImportError as e:
        sys.stderr.write(
            f"Error: {sys.executable} cannot import sae_mlops ({e}); activate the project's virtualenv "
            "(source .venv/bin/activate) before 'mlflow run ... --env-manager local', or use --env-manager virtualenv.\n"
        )
        return 2
    setup_logging(verbose=args.verbose)
    codes = {InputError: 2, TrackingError: 2, Interrupted: 130, **(errors or {})}
    try:
        return body() or 0
    except tuple(codes) as e:
        sys.stderr.write("Error: " + " ".join(str(e).split()) + "\n")
        return getattr(e, "exit_code", None) or next(c for t, c in codes.items() if isinstance(e, t))


def run(args: argparse.Namespace, call: Callable[[Any, argparse.Namespace], Any]) -> int:
    """Build the AnalysisConfig from `args`, then `call(cfg, args)` (through :func:`guarded`)."""

    def body() -> None:
        from sae_mlops.config import AnalysisConfig

        call(AnalysisConfig(**given(args, AnalysisConfig.__dataclass_fields__)), args)

    return guarded(args, body)
