"""`sae-mlops train`, `sae-mlops import` and `sae-mlops compare`: where SAEs come from, and how they compare.

Each command parses its options and makes one library call: `sae_mlops.training.train_and_log`,
`sae_mlops.tracking.training.import_sae`, `sae_mlops.tracking.compare.compare_and_log`.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sae_mlops.commands.app import app, err_console, out_console, report_input_errors, set_quiet, show_links, with_signature
from sae_mlops.metrics import format_value
from sae_mlops.training.config import TrainConfig, TrainRunOptions

if TYPE_CHECKING:
    from sae_mlops.tracking.training import SourceOutcome


class CompareFormat(str, Enum):
    table = "table"
    csv = "csv"
    md = "md"


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
    from sae_mlops.workflows import preflight
    from sae_mlops.training import train_and_log

    run = build(TrainRunOptions, options)
    set_quiet(run.quiet)
    preflight(Path(run.out) if run.out else None, track=True)
    cfg = build(TrainConfig, options)
    if run.seeds > 1:
        from sae_mlops.training import train_seeds_and_log

        seeds = train_seeds_and_log(cfg, run.seeds, run.out, register=run.register, experiment=run.experiment, run_name=run.run_name)
        for seed, one in zip(seeds.seeds, seeds.outcomes, strict=True):
            show_source(one, f"Trained SAE, seed {seed}")
        out_console.print(f"Parent run {seeds.parent_run_id}: {len(seeds.seeds)} seeds of recipe {seeds.recipe_hash} "
                          "(tag sae_mlops.recipe_hash)", soft_wrap=True, highlight=False)
        return
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
    run_name: Optional[str] = typer.Option(None, "--run-name", help="MLflow run name. (default: import · <dir name> · <architecture> d<d_sae> k<k>)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Import an SAE trained elsewhere as an MLflow training run + logged model (history.json becomes
    per-epoch metrics). The same SAE imported twice (same content hash) is recognised, not duplicated."""
    from sae_mlops.workflows import preflight
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
    all_runs: bool = typer.Option(
        False, "--all", help="Keep every analysis run. (default: the latest analysis per SAE content hash and kind)"
    ),
    fmt: CompareFormat = typer.Option(
        CompareFormat.table, "--format", case_sensitive=False,
        help="How the table is printed on stdout: table (for reading; full width when piped), csv or md (Markdown).",
    ),
    reference: Optional[str] = typer.Option(
        None, "--reference", help="The analysis every other is judged against: a run id (or its first 8+ characters), "
        "run name or SAE name. (default: the first, i.e. oldest, analysis compared)"),
    verdicts: bool = typer.Option(True, "--verdicts/--no-verdicts", help="Judge each analysis against --reference: "
        "difference, 95 % block-bootstrap interval (paired when the two share a token plan), Holm-corrected verdict "
        "better / worse / within noise, and seed noise floors when several seeds of a recipe are compared."),
    baseline: bool = typer.Option(False, "--baseline", help="Judge every trained SAE against each random-baseline SAE "
        "(trained with `sae-mlops train --baseline ...`) of the same hook, instead of one --reference: does it beat "
        "random directions, and on what?"),
    alpha: float = typer.Option(0.05, "--alpha", min=1e-6, max=0.5, help="Family-wise error rate of the verdicts (Holm over metrics x variants)."),
    resamples: int = typer.Option(9999, "--resamples", min=199, help="Bootstrap resamples per comparison (the smallest p-value is 2/(resamples+1))."),
    match: bool = typer.Option(False, "--match", help="Also match the features of every pair of full analyses compared (see `sae-mlops match`)."),
    match_limit: int = typer.Option(6, "--match-limit", min=2, help="With --match: at most this many full analyses (the newest)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Compare tracked analyses: a table (CSV + Markdown), Pareto plots of L0 vs loss recovered and vs
    explained variance with 95 % error bars, and verdicts against a reference (better / worse / within
    noise, with intervals of the differences), written under --out and logged as a comparison run."""
    from sae_mlops.workflows import preflight
    from sae_mlops.tracking.compare import compare_and_log

    set_quiet(quiet)
    preflight(out, track=True)  # the analyses are read from MLflow even with --no-track
    outcome = compare_and_log(
        experiment or None, filter_string, out, track=not no_track, experiment=log_to, run_name=run_name, all_runs=all_runs,
        reference=reference, verdicts=verdicts, alpha=alpha, resamples=resamples, baseline=baseline,
    )
    if fmt is not CompareFormat.table:
        print_table(outcome.table, fmt)
        where = err_console  # stdout holds only the table, for piping
    else:
        show_table(outcome.table)
        show_verdicts(outcome)
        where = out_console
    where.print(f"Files: {outcome.out_dir}", soft_wrap=True, highlight=False)
    for f in outcome.files:
        where.print(f"  {f}", soft_wrap=True, highlight=False)
    if outcome.run_id:
        if where is out_console:
            show_links(outcome.run_id)
        else:
            from sae_mlops.tracking.runs import run_links

            where.print(f"MLflow run: {outcome.run_id}  {run_links(outcome.run_id)['run']}", soft_wrap=True, highlight=False)
    if match:
        from sae_mlops.commands.match import match_compared

        match_compared(outcome, match_limit, where)


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
    show_links(outcome.run_id)
    if outcome.model_uri:
        out_console.print(f"Analyse it with: sae-mlops quick --sae {escape(outcome.model_uri)}", soft_wrap=True, highlight=False)


_HIDDEN = ("ce_clean", "ce_zero", "tokens")


def show_table(df: Any) -> None:
    """The comparison as a rich table; when stdout is not a terminal it is printed at its natural
    width (not folded into the 80 columns rich assumes for a pipe)."""
    from rich.console import Console

    from sae_mlops.outputs.comparison import table_rows

    shown = df.drop(columns=[c for c in _HIDDEN if c in df.columns]).copy()
    if "run_id" in shown:
        shown["run_id"] = shown["run_id"].str[:8]
    headers, rows = table_rows(shown)
    table = Table(title=f"{len(rows)} analyses")
    for h in headers:
        table.add_column(h, overflow="fold" if out_console.is_terminal else "ignore", no_wrap=not out_console.is_terminal)
    for row in rows:
        table.add_row(*[escape(c) for c in row])
    if out_console.is_terminal:
        out_console.print(table)
    else:
        Console(file=out_console.file, width=1000, color_system=None).print(table, crop=False, overflow="ignore")


def show_verdicts(outcome: Any) -> None:
    """The verdict table (one row per variant and metric), coloured by verdict, then how it was reached."""
    from sae_mlops.outputs.comparison import VERDICT_COLUMNS, verdict_cells

    if not outcome.verdicts:
        if outcome.verdict_note:
            out_console.print(outcome.verdict_note, soft_wrap=True, highlight=False)
        return
    refs = sorted({v.reference for v in outcome.verdicts})
    table = Table(title=f"Verdicts against {refs[0]}" if len(refs) == 1 else f"Verdicts against {len(refs)} references")
    for h in VERDICT_COLUMNS:
        table.add_column(h, justify="right" if h in ("difference", "p (Holm)") else "left")

    colour = {"better": "green", "worse": "red"}
    for v in outcome.verdicts:
        cells = [escape(c) for c in verdict_cells(v)]
        if v.verdict in colour:
            cells[7] = f"[{colour[v.verdict]}]{cells[7]}[/]"
        table.add_row(*cells)
    if out_console.is_terminal:
        out_console.print(table)
    else:
        from rich.console import Console

        Console(file=out_console.file, width=1000, color_system=None).print(table, crop=False, overflow="ignore")
    out_console.print(outcome.verdict_note, soft_wrap=True, highlight=False, style="dim")


def print_table(df: Any, fmt: CompareFormat) -> None:
    """The comparison table on stdout as CSV (every column) or Markdown (the readable columns)."""
    from sae_mlops.outputs.comparison import markdown_table

    if fmt is CompareFormat.csv:
        typer.echo(df.drop(columns=[c for c in ("label",) if c in df.columns]).to_csv(index=False), nl=False)
    else:
        typer.echo(markdown_table(df), nl=False)
