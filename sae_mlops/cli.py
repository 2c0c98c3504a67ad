"""The ``sae-mlops`` command line: thin Typer commands, one library call each.

Heavy modules (torch, transformer-lens, mlflow) are imported inside the commands so that
``sae-mlops --help`` stays fast. A user mistake (`InputError`) becomes one red sentence on stderr
and exit code 2, without a traceback.
"""

from __future__ import annotations

import functools
import logging
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sae_mlops.errors import InputError

if TYPE_CHECKING:
    from sae_mlops.pipeline import QuickOutcome

log = logging.getLogger("sae_mlops.cli")

app = typer.Typer(
    name="sae-mlops",
    help="Experiment-tracked analysis of sparse autoencoders (SAEs) on language-model activations.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

out_console = Console()
_state: dict[str, bool] = {"verbose": False}
err_console = Console(stderr=True)

DEMO_EXPERIMENT = "sae-mlops-demo"
DEMO_KINDS = ("standard", "batchtopk", "saelens")
DEMO_MAX_TOKENS = 100_000  # keeps `make demo` to a few minutes on a laptop CPU

# Headline metrics shown after a run (all are logged; see sae_mlops.results for the scheme).
HEADLINE = (
    ("tokens/analysed", "analysed tokens", "{:,.0f}"),
    ("sparsity/l0_mean", "L0 (mean active features / token)", "{:.2f}"),
    ("sparsity/l1_mean", "L1 (mean sum |f| / token)", "{:.4g}"),
    ("features/dead_count", "dead features", "{:,.0f}"),
    ("features/dead_fraction", "dead fraction", "{:.4f}"),
    ("features/dense_count", "dense features", "{:,.0f}"),
    ("recon/explained_variance", "explained variance", "{:.4f}"),
    ("recon/cosine", "cosine(x, x_hat)", "{:.4f}"),
    ("recon/mse_per_token", "MSE per token", "{:.4g}"),
    ("downstream/ce_clean", "CE clean (nats)", "{:.4f}"),
    ("downstream/ce_sae", "CE with SAE (nats)", "{:.4f}"),
    ("downstream/ce_zero", "CE zero-ablated (nats)", "{:.4f}"),
    ("downstream/loss_recovered", "loss recovered", "{:.4f}"),
    ("downstream/kl_sae", "KL(clean || SAE) (nats)", "{:.4g}"),
    ("speed/tokens_per_s", "tokens / s", "{:,.0f}"),
)


class TopkMode(str, Enum):
    batch = "batch"
    threshold = "threshold"


F = TypeVar("F", bound=Callable[..., Any])


def report_input_errors(fn: F) -> F:
    """Turn `InputError` into one red sentence on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            fail(str(e), getattr(e, "exit_code", 2))

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int = 2) -> None:
    """Print `message` as a single red line on stderr and exit with `code`."""
    one_line = " ".join(str(message).split()) or "invalid input"
    err_console.print(f"[bold red]Error:[/bold red] [red]{escape(one_line)}[/red]", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging (rich, on stderr)."),
) -> None:
    """Analyse SAEs, write results under analysis/, and track every run in MLflow."""
    from sae_mlops.logging_setup import setup_logging

    _state["verbose"] = verbose
    setup_logging(verbose=verbose)


# --- quick ------------------------------------------------------------------------------------


@app.command()
@report_input_errors
def quick(
    sae: str = typer.Option(
        ...,
        "--sae",
        help="The SAE: a directory in the prior tool's format (config.json + weights.pt), a SAELens "
        "directory (cfg.json + sae_weights.safetensors), a SAELens release (with --sae-id), "
        "runs:/<run_id>/<path>, models:/<name>/<version> or models:/<name>@<alias>.",
    ),
    sae_id: Optional[str] = typer.Option(None, "--sae-id", help="SAE id within a SAELens release given as --sae."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="Base model: a TransformerLens name (e.g. gpt2), a local Hugging Face checkpoint directory, "
        "or 'demo'. (default: the model recorded in the SAE's metadata)",
    ),
    corpus: Optional[str] = typer.Option(
        None,
        "--corpus",
        help="Texts to analyse: JSON list of strings, JSONL (see --text-field), Parquet (column --text-field) "
        "or a plain-text file. (default: the demo corpus when --model is demo)",
    ),
    text_field: str = typer.Option("text", "--text-field", help="Field (JSONL) or column (Parquet) holding the text."),
    hook: Optional[str] = typer.Option(
        None, "--hook", help="TransformerLens hook name, e.g. blocks.9.hook_resid_post. (default: the SAE's recorded hook)"
    ),
    max_tokens: int = typer.Option(
        1_000_000, "--max-tokens", min=1, help="Token budget: analysed (non-special) tokens to process, or the whole corpus if smaller. Unit: tokens."
    ),
    context_size: Optional[int] = typer.Option(
        None, "--context-size", min=2, help="Tokens per window. (default: the SAE's training context size, else 128)"
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Windows per batch (batch-global BatchTopK depends on it)."),
    prepend_bos: Optional[bool] = typer.Option(
        None, "--prepend-bos/--no-prepend-bos", help="Start each window with BOS. (default: as the SAE's metadata says, else the model's default)"
    ),
    topk_mode: Optional[TopkMode] = typer.Option(
        None,
        "--topk-mode",
        case_sensitive=False,
        help="Prior-format BatchTopK SAEs only: 'batch' (the batch-global top-k rule) or 'threshold' "
        "(JumpReLU with one threshold). (default: batch)",
    ),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Activation threshold theta for --topk-mode threshold. (default: estimated on the corpus)"
    ),
    rare_threshold: float = typer.Option(1e-5, "--rare-threshold", help="A feature firing on a fraction of analysed tokens in (0, this) is rare."),
    dense_threshold: float = typer.Option(0.1, "--dense-threshold", help="A feature firing on more than this fraction of analysed tokens is dense."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("float32", "--dtype", help="Model and SAE dtype: float32, float16 or bfloat16."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output directory. (default: analysis/<sae dir name>/quick_<UTC timestamp>)"
    ),
    experiment: Optional[str] = typer.Option(
        None, "--experiment", help="MLflow experiment for the run. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)"
    ),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="MLflow run name. (default: generated by MLflow)"),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log to MLflow; only write files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars."),
) -> None:
    """Quick analysis of one SAE: sparsity, dead/rare/dense features, reconstruction, CE/KL downstream.

    One streaming pass over at most --max-tokens tokens. Writes a results JSON and a readable
    summary under --out and logs params, metrics, lineage tags and those files to MLflow
    (MLFLOW_TRACKING_URI, else MLflow's default local store).
    """
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.pipeline import run_quick_and_log

    _quiet(quiet)
    cfg = AnalysisConfig(
        sae=sae,
        sae_id=sae_id,
        model=model,
        corpus=corpus,
        text_field=text_field,
        hook=hook,
        max_tokens=max_tokens,
        context_size=context_size,
        batch_size=batch_size,
        prepend_bos=prepend_bos,
        topk_mode=topk_mode.value if topk_mode is not None else None,
        threshold=threshold,
        rare_threshold=rare_threshold,
        dense_threshold=dense_threshold,
        device=device,
        dtype=dtype,
        progress=not quiet,
    )
    outcome = run_quick_and_log(cfg, out, track=not no_track, experiment=experiment, run_name=run_name)
    show_outcome(outcome, title=f"Quick analysis: {sae}")
    if outcome.tracking_uri:
        out_console.print(f"Open the UI with: mlflow ui --backend-store-uri {outcome.tracking_uri}", soft_wrap=True)


# --- demo -------------------------------------------------------------------------------------


@app.command()
@report_input_errors
def demo(
    max_tokens: int = typer.Option(
        DEMO_MAX_TOKENS, "--max-tokens", min=1, help="Token budget per SAE (the demo corpus holds about 470k tokens). Unit: tokens."
    ),
    device: str = typer.Option("auto", "--device", help="Torch device: auto, cpu, cuda, mps."),
    experiment: str = typer.Option(DEMO_EXPERIMENT, "--experiment", help="MLflow experiment for the demo runs."),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log to MLflow; only write files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars."),
) -> None:
    """Offline end-to-end demo: builds (or reuses) the demo model, corpus and three SAEs, runs the
    quick analysis on each (standard, BatchTopK and SAELens formats) and logs each to MLflow."""
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_corpus_path, demo_sae_path, ensure_demo_assets
    from sae_mlops.pipeline import run_quick_and_log

    _quiet(quiet)
    log.info("Preparing demo assets (built once, then cached)...")
    ensure_demo_assets()
    corpus = str(demo_corpus_path())
    outcomes: list[tuple[str, QuickOutcome]] = []
    for kind in DEMO_KINDS:
        cfg = AnalysisConfig(
            sae=str(demo_sae_path(kind)),
            model="demo",
            corpus=corpus,
            max_tokens=max_tokens,
            device=device,
            progress=not quiet,
        )
        log.info("Quick analysis of the %s demo SAE", kind)
        outcome = run_quick_and_log(cfg, track=not no_track, experiment=experiment, run_name=f"demo-{kind}")
        outcomes.append((kind, outcome))
        show_outcome(outcome, title=f"Demo SAE: {kind}")

    summary = Table(title="Demo results")
    summary.add_column("SAE")
    summary.add_column("L0", justify="right")
    summary.add_column("explained variance", justify="right")
    summary.add_column("loss recovered", justify="right")
    for kind, o in outcomes:
        m = o.result.metrics
        summary.add_row(
            kind,
            _fmt(m.get("sparsity/l0_mean"), "{:.2f}"),
            _fmt(m.get("recon/explained_variance"), "{:.4f}"),
            _fmt(m.get("downstream/loss_recovered"), "{:.4f}"),
        )
    out_console.print(summary)
    for kind, o in outcomes:
        run = f"MLflow run {o.run_id}" if o.run_id else "not tracked"
        out_console.print(f"{kind}: results in {o.out_dir} ({run})", soft_wrap=True, highlight=False)
    uri = next((o.tracking_uri for _, o in outcomes if o.tracking_uri), None)
    if uri:
        out_console.print(f"Runs are in MLflow experiment '{experiment}' at {uri}", soft_wrap=True)
        out_console.print(f"Open the UI with: mlflow ui --backend-store-uri {uri}", soft_wrap=True)
        out_console.print("then browse to http://127.0.0.1:5000", soft_wrap=True)


# --- shared output ----------------------------------------------------------------------------


def show_headline(outcome: QuickOutcome, title: str) -> None:
    """The headline metrics as a table, then any warnings (on stderr)."""
    m = outcome.result.metrics
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("name", style="dim")
    table.add_column("value", justify="right")
    for key, label, fmt in HEADLINE:
        if key in m:
            table.add_row(label, key, _fmt(m[key], fmt))
    out_console.print(table)
    for w in outcome.warnings:
        err_console.print(f"[yellow]Warning:[/yellow] {escape(w)}", soft_wrap=True)


def show_outcome(outcome: QuickOutcome, title: str) -> None:
    """A short table of headline metrics, then where the files and the run are."""
    show_headline(outcome, title)
    out_console.print(f"Files: {outcome.out_dir}", soft_wrap=True)
    for f in outcome.files:
        out_console.print(f"  {f}", soft_wrap=True, highlight=False)
    if outcome.run_id:
        from sae_mlops.tracking.runs import run_url

        out_console.print(f"MLflow run: {outcome.run_id} ({run_url(outcome.run_id)})", soft_wrap=True)


def _fmt(v: Any, fmt: str) -> str:
    if v is None:
        return "n/a"
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def _quiet(quiet: bool) -> None:
    if quiet:
        from sae_mlops.logging_setup import setup_logging

        setup_logging(verbose=_state["verbose"], quiet=not _state["verbose"])


# Command modules register themselves on `app` (they import the helpers above).
from sae_mlops.commands import full as _full_commands  # noqa: E402,F401
from sae_mlops.commands import report as _report_commands  # noqa: E402,F401
from sae_mlops.commands import lineage as _lineage_commands  # noqa: E402,F401
from sae_mlops.commands import serve as _serve_commands  # noqa: E402,F401
from sae_mlops.commands import match as _match_commands  # noqa: E402,F401
from sae_mlops.commands import dashboard as _dashboard_commands  # noqa: E402,F401
from sae_mlops.commands import label as _label_commands  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    app()
