"""MLproject entry point ``report``: parse the -P parameters and make one library call.

``mlflow run . -e report -P run_id=RUN_ID [-P features=3,17]`` executes the interpretation notebook
on that run's full analysis (`sae_mlops.interp.notebook_report.generate_report`) and logs the executed
notebook and its HTML to the analysis run, and also to the run ``mlflow run`` created for this
entry point (tagged ``sae_mlops.report_of_run``). ``-P analysis_dir=DIR`` reports on a local
directory instead (logged to the entry point's run only). An empty string means "not given". A user
mistake exits with code 2 and one sentence on stderr; a failing notebook cell exits with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import boolean, guarded, opt, whole  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entrypoints/report.py", description="Interpretation report of a full analysis (the MLproject 'report' entry point).")
    p.add_argument("--run-id", type=opt(str), default=None, help="MLflow run of `sae-mlops full` (empty: use --analysis-dir)")
    p.add_argument("--analysis-dir", type=opt(str), default=None, help="local output directory of `sae-mlops full`")
    p.add_argument("--features", type=opt(str), default=None, help="comma-separated feature indices (empty: chosen automatically)")
    p.add_argument("--out", type=opt(str), default=None, help="output directory (empty: <analysis dir>/report or analysis/reports/<run id>)")
    p.add_argument("--top1-threshold", type=opt(float), default=None, help="token density: interpretable at this top-1 share (empty: 0.9)")
    p.add_argument("--top3-threshold", type=opt(float), default=None, help="token density: medium at this top-3 share (empty: 0.9)")
    p.add_argument("--cooccurrence-threshold", type=opt(float), default=None, help="cluster threshold (empty: 0.3)")
    p.add_argument("--cluster-index", type=opt(whole), default=None, help="cluster for the deep dive (empty: 0, the largest)")
    p.add_argument("--load-decoder", type=opt(boolean), default=None, help="load the SAE for decoder views (empty: true)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


# argparse dest -> notebook parameter
NOTEBOOK_PARAMETERS = {
    "top1_threshold": "top1_threshold",
    "top3_threshold": "top3_threshold",
    "cooccurrence_threshold": "cooccurrence_threshold",
    "cluster_index": "cluster_index",
    "load_decoder": "load_sae_decoder",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parameters = {nb: getattr(args, dest) for dest, nb in NOTEBOOK_PARAMETERS.items() if getattr(args, dest) is not None}

    def body() -> None:
        from sae_mlops.interp.notebook_report import generate_report, parse_features

        outputs = generate_report(
            run_id=args.run_id,
            analysis_dir=args.analysis_dir,
            features=parse_features(args.features),
            out_dir=args.out,
            parameters=parameters,
            extra_log_run=os.environ.get("MLFLOW_RUN_ID") or None,
        )
        sys.stdout.write(f"Notebook: {outputs.notebook}\nHTML: {outputs.html}\n")

    try:
        from sae_mlops.interp.notebook_report import ReportError
    except ImportError:
        return guarded(args, body)
    return guarded(args, body, errors={ReportError: 1})


if __name__ == "__main__":
    sys.exit(main())
