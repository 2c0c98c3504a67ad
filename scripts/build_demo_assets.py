#!/usr/bin/env python
"""Rebuild the embedded demo assets (corpus, tokenizer, model, SAEs) offline.

Usage: python scripts/build_demo_assets.py [--out DIR] [--threads N]
Default output: sae_mlops/demo/assets/ (the committed assets). Takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from sae_mlops.demo import ASSETS_DIR
from sae_mlops.demo.build import build_demo_assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(4, cores))")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    info = build_demo_assets(args.out, threads=args.threads)
    print(json.dumps({"model": {k: v for k, v in info["model"].items() if k != "config"}, "saes": info["saes"]}, indent=2))
    print(f"rebuilt {args.out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
