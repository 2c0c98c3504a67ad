"""MLproject entry point ``compare``: parse the -P parameters and make one library call.

``mlflow run . -e compare [-P experiments=exp1,exp2] [-P filter="params.sae_architecture = 'topk'"]``
compares the tracked quick/full analyses (`sae_mlops.tracking.compare.compare_and_log`): a table
(CSV + Markdown) and Pareto plots, logged as artifacts of the run ``mlflow run`` created and written
under ``out``. An empty string means "not given". A user mistake exits with code 2 and one sentence
on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import guarded, opt  # noqa: E402


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entrypoints/compare.py", description="Compare tracked SAE analyses (the MLproject 'compare' entry point).")
    p.add_argument("--experiments", type=opt(_names), default=None, help="comma-separated experiment names (empty: every experiment)")
    p.add_argument("--filter", type=opt(str), default=None, help="MLflow search filter string (empty: none)")
    p.add_argument("--out", type=opt(str), default=None, help="output directory (empty: analysis/comparisons/compare_<ts>)")
    p.add_argument("--reference", type=opt(str), default=None, help="run id / run name / SAE name every analysis is judged against (empty: the first)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from sae_mlops.tracking.compare import compare_and_log

        outcome = compare_and_log(args.experiments or None, args.filter, args.out, track=True, reference=args.reference)
        sys.stdout.write(f"{len(outcome.table)} analyses compared; files in {outcome.out_dir}; run {outcome.run_id}\n")

    return guarded(args, body)


if __name__ == "__main__":
    sys.exit(main())
