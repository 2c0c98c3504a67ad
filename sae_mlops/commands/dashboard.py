"""`sae-mlops dashboard RUN_OR_DIR`: static per-feature HTML pages and an index (one library call:
`sae_mlops.features.dashboard.write_dashboards`), logged to the analysis run under `dashboard/`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sae_mlops.commands.app import app, out_console, report_input_errors, set_quiet

DASHBOARD_DIR = "dashboard"


@app.command()
@report_input_errors
def dashboard(
    analysis: str = typer.Argument(..., help="Output directory of `sae-mlops full`, an MLflow run id or runs:/<run_id>."),
    features: Optional[str] = typer.Option(None, "--features", help="Features to write pages for, comma-separated (added to --top)."),
    top: int = typer.Option(200, "--top", min=0, help="Also the N most frequent features that fired."),
    context: int = typer.Option(12, "--context", min=0, help="Tokens either side of each example."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory. (default: <analysis dir>/dashboard)"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="MLflow run to log the pages to when ANALYSIS is a local directory."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log the pages and timing metrics to the analysis run (when it is known)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Feature dashboards: one self-contained HTML page per chosen feature (histogram, top examples
    shaded by activation, logit lens, similar and co-occurring features, label) and an index page."""
    from sae_mlops.features.dashboard import write_dashboards
    from sae_mlops.features.sources import RUNS_DIR, resolve_analysis, run_id_of
    from sae_mlops.interp.notebook_report import parse_features

    set_quiet(quiet)
    rid = run_id_of(analysis)
    ref = resolve_analysis(analysis, activation_db=True, run_id=run_id, download_to=RUNS_DIR / rid if rid else None)
    outcome = write_dashboards(ref.root, out, parse_features(features), top=top, context=context)
    m = outcome.metrics()
    out_console.print(
        f"{len(outcome.pages)} feature pages in {outcome.seconds_total:.1f} s ({m['dashboard/seconds_per_page_mean'] * 1000:.0f} ms per page)",
        highlight=False,
    )
    out_console.print(f"Index: {outcome.index}", soft_wrap=True, highlight=False)
    if ref.run_id and log:
        from sae_mlops.tracking.features import TAG_DASHBOARD, log_to_analysis_run

        log_to_analysis_run(ref.run_id, outcome.files, outcome.out_dir, DASHBOARD_DIR, m, {TAG_DASHBOARD: f"{DASHBOARD_DIR}/index.html"})
        out_console.print(f"Logged to MLflow run {ref.run_id} under {DASHBOARD_DIR}/", soft_wrap=True, highlight=False)
