"""`sae-mlops report`: execute the interpretation notebook on a full analysis, render it as HTML and
log both to the analysis's MLflow run (one call: `sae_mlops.interp.notebook_report.generate_report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sae_mlops.commands.app import set_quiet, app, fail, out_console, report_input_errors


@app.command()
@report_input_errors
def report(
    run_id: Optional[str] = typer.Option(
        None, "--run-id", help="MLflow run of `sae-mlops full`: its artifacts are downloaded and the report is logged to it (under report/)."
    ),
    analysis_dir: Optional[Path] = typer.Option(
        None, "--analysis-dir", help="Local output directory of `sae-mlops full` (with --run-id too: read from here, log to the run)."
    ),
    features: Optional[str] = typer.Option(None, "--features", help="Feature indices for the deep dives, comma-separated, e.g. 3,17,42. (default: chosen automatically)"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where the executed notebook and HTML go. (default: <analysis-dir>/report, or analysis/reports/<run id>)"
    ),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI. (default: $MLFLOW_TRACKING_URI, else MLflow's default)"),
    top1_threshold: float = typer.Option(0.9, "--top1-threshold", min=0.0, max=1.0, help="Token density: 'interpretable' when the top-1 trigger-token share is at least this."),
    top3_threshold: float = typer.Option(0.9, "--top3-threshold", min=0.0, max=1.0, help="Token density: 'medium' when the top-3 share is at least this."),
    cooccurrence_threshold: float = typer.Option(0.3, "--cooccurrence-threshold", help="Clusters: average pairwise co-occurrence at least this."),
    cluster_index: int = typer.Option(0, "--cluster-index", min=0, help="Cluster for the deep dive (0 = the largest)."),
    no_decoder: bool = typer.Option(False, "--no-decoder", help="Do not load the SAE (skips decoder norms and PCA)."),
    no_log: bool = typer.Option(False, "--no-log", help="With --run-id: do not log the report to the run."),
    notebook: Optional[Path] = typer.Option(None, "--notebook", help="Another notebook to execute with the same parameters. (default: notebooks/interp_analysis.ipynb)"),
    show_code: bool = typer.Option(False, "--show-code", help="Keep the code cells in the HTML report (hidden by default: readers see results)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Interpretation report: run notebooks/interp_analysis.ipynb (papermill) on a full analysis,
    write the executed notebook and a self-contained HTML page, and log both to the MLflow run."""
    from sae_mlops.interp.notebook_report import ReportError, generate_report, parse_features
    from sae_mlops.preflight import check_out_dir

    set_quiet(quiet)
    if out is not None:
        check_out_dir(out)
    if run_id:
        from sae_mlops.tracking.preflight import check_tracking_store

        check_tracking_store(tracking_uri)
    try:
        outputs = generate_report(
            run_id=run_id,
            analysis_dir=analysis_dir,
            features=parse_features(features),
            out_dir=out,
            tracking_uri=tracking_uri,
            parameters={
                "top1_threshold": top1_threshold,
                "top3_threshold": top3_threshold,
                "cooccurrence_threshold": cooccurrence_threshold,
                "cluster_index": cluster_index,
                "load_sae_decoder": not no_decoder,
            },
            notebook=notebook,
            log_to_run=not no_log,
            show_code=show_code,
        )
    except ReportError as e:
        fail(str(e), 1)
        return
    out_console.print(f"Notebook: {outputs.notebook}", soft_wrap=True, highlight=False)
    out_console.print(f"HTML:     {outputs.html}", soft_wrap=True, highlight=False)
    if outputs.artifacts:
        out_console.print(f"Logged to MLflow run {outputs.run_id}: {', '.join(outputs.artifacts)}", soft_wrap=True, highlight=False)
