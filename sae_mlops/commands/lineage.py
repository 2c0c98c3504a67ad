"""`sae-mlops train`, `sae-mlops import` and `sae-mlops compare`: where SAEs come from, and how they compare.

Each command parses its options and makes one library call: `sae_mlops.training.train_and_log`,
`sae_mlops.tracking.training.import_sae`, `sae_mlops.tracking.compare.compare_and_log`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sae_mlops.cli import app, format_value, out_console, report_input_errors, set_quiet, with_signature
from sae_mlops.training.config import TrainConfig, TrainRunOptions

if TYPE_CHECKING:
    from sae_mlops.tracking.training import SourceOutcome


_REGISTER_HELP = "Register the SAE as a new version of this MLflow registered model (created if needed)."
_ALIAS_HELP = "Set this alias (e.g. champion) on the registered version; needs --register."


# --- train ------------------------------------------------------------------------------------


def _train_parameters() -> list[inspect.Parameter]:
    """`train`'s options: every `TrainConfig` option, then `TrainRunOptions` (output, registry, tracking)."""
    from sae_mlops.options import typer_parameters

    return typer_parameters(TrainConfig) + typer_parameters(TrainRunOptions)


@app.command()
@report_input_errors
@with_signature(_train_parameters())
def train(**options: Any) -> None:
    """Train an SAE with SAELens and log it to MLflow as a training run: config as params; loss, MSE,
    L0 and dead features per step as metrics; the SAE as artifacts and as a logged model
    (optionally registered)."""
    from sae_mlops.options import build
    from sae_mlops.pipeline import preflight
    from sae_mlops.training import train_and_log

    run = build(TrainRunOptions, options)
    set_quiet(run.quiet)
    preflight(run.out, track=True)
    cfg = build(TrainConfig, options)
    outcome = train_and_log(cfg, run.out, register=run.register, alias=run.alias, experiment=run.experiment, run_name=run.run_name)
    show_source(outcome, "Trained SAE")


# --- import -----------------------------------------------------------------------------------


@app.command("import")
@report_input_errors
def import_(
    path: Path = typer.Argument(..., help="SAE directory: the prior tool's format (config.json + weights.pt [+ history.json]) or SAELens (cfg.json + sae_weights.safetensors)."),
    register: Optional[str] = typer.Option(None, "--register", help=_REGISTER_HELP),
    alias: Optional[str] = typer.Option(None, "--alias", help=_ALIAS_HELP),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="MLflow run name. (default: import-<dir name>)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Import an SAE trained elsewhere as an MLflow training run + logged model (history.json becomes
    per-epoch metrics). The same SAE imported twice (same content hash) is recognised, not duplicated."""
    from sae_mlops.pipeline import preflight
    from sae_mlops.tracking.training import import_sae

    set_quiet(quiet)
    preflight(None, track=True)
    outcome = import_sae(path, register=register, alias=alias, experiment=experiment, run_name=run_name)
    if outcome.existing:
        out_console.print(
            f"Already in MLflow: this SAE (hash {outcome.sae_hash[:12]}) was logged by {outcome.kind} run "
            f"{outcome.run_id}; no new run was created.",
            soft_wrap=True,
            highlight=False,
        )
    show_source(outcome, "Imported SAE" if not outcome.existing else "Existing SAE")


# --- compare ----------------------------------------------------------------------------------


@app.command()
@report_input_errors
def compare(
    experiment: Optional[List[str]] = typer.Option(
        None, "--experiment", "-e", help="Experiment whose analyses to compare (repeatable). (default: every experiment)"
    ),
    filter_string: Optional[str] = typer.Option(
        None, "--filter", help="MLflow search filter, e.g. \"metrics.`sparsity/l0_mean` < 50\" or \"params.sae_architecture = 'topk'\"."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory. (default: analysis/comparisons/compare_<UTC timestamp>)"),
    log_to: Optional[str] = typer.Option(
        None, "--log-to", help="Experiment for the comparison run. (default: the compared experiment when there is one, else sae-mlops)"
    ),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="MLflow run name of the comparison run. (default: compare)"),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log a comparison run; only write files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Compare tracked analyses: a table (CSV + Markdown) and Pareto plots of L0 vs loss recovered and
    vs explained variance, written under --out and logged as artifacts of a comparison run."""
    from sae_mlops.pipeline import preflight
    from sae_mlops.tracking.compare import compare_and_log

    set_quiet(quiet)
    preflight(out, track=True)  # the analyses are read from MLflow even with --no-track
    outcome = compare_and_log(
        experiment or None, filter_string, out, track=not no_track, experiment=log_to, run_name=run_name
    )
    show_table(outcome.table)
    out_console.print(f"Files: {outcome.out_dir}", soft_wrap=True)
    for f in outcome.files:
        out_console.print(f"  {f}", soft_wrap=True, highlight=False)
    if outcome.run_id:
        from sae_mlops.tracking.runs import run_url

        out_console.print(f"MLflow run: {outcome.run_id} ({run_url(outcome.run_id)})", soft_wrap=True)


# --- output -----------------------------------------------------------------------------------


def show_source(outcome: SourceOutcome, title: str) -> None:
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", overflow="fold")
    table.add_row("MLflow run", outcome.run_id)
    table.add_row("SAE content hash", outcome.sae_hash)
    table.add_row("logged model", outcome.model_id or "n/a")
    if outcome.registration:
        r = outcome.registration
        table.add_row("registered model", f"{r.name} version {r.version}" + (f" (@{r.alias})" if r.alias else ""))
    if outcome.sae_dir:
        table.add_row("SAE directory", str(outcome.sae_dir))
    for key in ("train/final_l0", "train/final_dead_features", "train/final_loss", "train/final_explained_variance", "train/seconds"):
        if key in outcome.metrics:
            table.add_row(key, format_value(outcome.metrics[key], "{:.4g}"))
    out_console.print(table)
    if outcome.model_uri:
        out_console.print(f"Analyse it with: sae-mlops quick --sae {escape(outcome.model_uri)}", soft_wrap=True, highlight=False)


def show_table(df: Any) -> None:
    from sae_mlops.writers.comparison import table_rows

    headers, rows = table_rows(df.drop(columns=[c for c in ("ce_clean", "ce_zero", "tokens") if c in df.columns]))
    table = Table(title=f"{len(rows)} analyses")
    for h in headers:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*[escape(c) for c in row])
    out_console.print(table)
