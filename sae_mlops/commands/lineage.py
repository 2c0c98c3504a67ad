"""`sae-mlops train`, `sae-mlops import` and `sae-mlops compare`: where SAEs come from, and how they compare.

Each command parses its options and makes one library call: `sae_mlops.training.train_and_log`,
`sae_mlops.tracking.training.import_sae`, `sae_mlops.tracking.compare.compare_and_log`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sae_mlops.cli import _fmt, _quiet, app, out_console, report_input_errors

if TYPE_CHECKING:
    from sae_mlops.tracking.training import SourceOutcome


class Architecture(str, Enum):
    standard = "standard"
    topk = "topk"
    batchtopk = "batchtopk"
    jumprelu = "jumprelu"


_REGISTER_HELP = "Register the SAE as a new version of this MLflow registered model (created if needed)."
_ALIAS_HELP = "Set this alias (e.g. champion) on the registered version; needs --register."


# --- train ------------------------------------------------------------------------------------


@app.command()
@report_input_errors
def train(
    model: str = typer.Option("demo", "--model", help="Base model: a TransformerLens name, a local Hugging Face checkpoint directory, or 'demo'."),
    corpus: Optional[str] = typer.Option(
        None, "--corpus", help="Training texts: JSON list of strings, JSONL, Parquet or .txt. (default: the demo corpus with the demo model)"
    ),
    text_field: str = typer.Option("text", "--text-field", help="Field (JSONL) or column (Parquet) holding the text."),
    hook: Optional[str] = typer.Option(None, "--hook", help="Hook to train on, e.g. blocks.0.hook_resid_post. (default: the demo hook with the demo model)"),
    architecture: Architecture = typer.Option(Architecture.topk, "--architecture", case_sensitive=False, help="SAELens training architecture."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", min=1, help="Dictionary size. (default: 8 x the hook's width)"),
    k: int = typer.Option(16, "--k", min=1, help="Active features per token (topk) or per token on average (batchtopk)."),
    l1_coefficient: Optional[float] = typer.Option(
        None, "--l1-coefficient", help="Sparsity penalty: L1 coefficient (standard) or L0 coefficient (jumprelu). (default: 5.0 / 1.0)"
    ),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate."),
    training_tokens: int = typer.Option(300_000, "--training-tokens", min=1, help="Activations to train on. Unit: tokens."),
    batch_size_tokens: int = typer.Option(1024, "--batch-size-tokens", min=1, help="Tokens per training step."),
    context_size: Optional[int] = typer.Option(None, "--context-size", min=2, help="Tokens per window. (default: min(128, the model's n_ctx))"),
    dead_feature_window: int = typer.Option(100, "--dead-feature-window", min=1, help="Steps without firing after which a feature counts as dead."),
    seed: int = typer.Option(42, "--seed", help="Random seed."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto, cpu, cuda, mps."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to save the SAE (SAELens format). (default: saes/<architecture>_<d_sae>_<UTC timestamp>)"),
    register: Optional[str] = typer.Option(None, "--register", help=_REGISTER_HELP),
    alias: Optional[str] = typer.Option(None, "--alias", help=_ALIAS_HELP),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="MLflow run name. (default: train-<architecture>-<d_sae>)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Train an SAE with SAELens and log it to MLflow as a training run: config as params; loss, MSE,
    L0 and dead features per step as metrics; the SAE as artifacts and as a logged model
    (optionally registered)."""
    from sae_mlops.training import TrainConfig, train_and_log

    _quiet(quiet)
    cfg = TrainConfig(
        model=model,
        corpus=corpus,
        text_field=text_field,
        hook=hook,
        architecture=architecture.value,
        d_sae=d_sae,
        k=k,
        l1_coefficient=l1_coefficient,
        lr=lr,
        training_tokens=training_tokens,
        batch_size_tokens=batch_size_tokens,
        context_size=context_size,
        dead_feature_window=dead_feature_window,
        seed=seed,
        device=device,
    )
    outcome = train_and_log(cfg, out, register=register, alias=alias, experiment=experiment, run_name=run_name)
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
    from sae_mlops.tracking.training import import_sae

    _quiet(quiet)
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
    match: bool = typer.Option(False, "--match", help="Also match the features of every pair of full analyses compared (see `sae-mlops match`)."),
    match_limit: int = typer.Option(6, "--match-limit", min=2, help="With --match: at most this many full analyses (the newest)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Compare tracked analyses: a table (CSV + Markdown) and Pareto plots of L0 vs loss recovered and
    vs explained variance, written under --out and logged as artifacts of a comparison run."""
    from sae_mlops.tracking.compare import compare_and_log

    _quiet(quiet)
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
    if match:
        from sae_mlops.commands.match import match_compared

        match_compared(outcome, match_limit)


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
            table.add_row(key, _fmt(outcome.metrics[key], "{:.4g}"))
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
