"""The Typer application every command registers on, and what the commands share: one-sentence
errors (`report_input_errors`, `fail`), the consoles, quiet mode, the generated analysis options
(`analysis_parameters`, `with_signature`) and the result tables and links (`show_headline`,
`show_outcome`, `show_links`).

Heavy modules (torch, transformer-lens, mlflow) are imported inside the commands so that
``sae-mlops --help`` stays fast. A user mistake (`InputError`) becomes one red sentence on stderr
and exit code 2, without a traceback. `sae_mlops.cli` imports the command modules (which import
this one) and is the console script; nothing here imports back into it.
"""

from __future__ import annotations

import atexit
import functools
import gc
import inspect
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sae_mlops.errors import InputError, Interrupted, TrackingError
from sae_mlops.metrics import format_with_interval, headline_metrics

if TYPE_CHECKING:
    from sae_mlops.workflows import QuickOutcome

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
state: dict[str, bool] = {"verbose": False}
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def report_input_errors(fn: F) -> F:
    """Turn `InputError` and `TrackingError` into one red sentence on stderr and exit code 2, and
    Ctrl-C into one sentence (what was left behind, when the command knows) and exit code 130;
    no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InputError, TrackingError) as e:
            fail(str(e), getattr(e, "exit_code", 2))
        except Interrupted as e:  # AnalysisInterrupted included: the message says what was left behind
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted by the user (Ctrl-C); the command did not finish.", Interrupted.exit_code)

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int = 2) -> None:
    """Print `message` as a single red line on stderr and exit with `code`."""
    from sae_mlops.redact import redact

    one_line = " ".join(redact(message).split()) or "invalid input"
    err_console.print(f"[bold red]Error:[/bold red] [red]{escape(one_line)}[/red]", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging (rich, on stderr)."),
) -> None:
    """Analyse SAEs, write results under analysis/, and track every run in MLflow."""
    from sae_mlops.logging_setup import setup_logging

    state["verbose"] = verbose
    setup_logging(verbose=verbose)
    if not state.get("gc_frozen_at_exit"):
        # The interpreter's last collections walk every object torch, TransformerLens and SQLAlchemy
        # made: 3 s at exit on an idle machine, 30-45 s on a loaded one, after the command (or its
        # Ctrl-C) has finished. Nothing left needs them: frozen objects are skipped.
        atexit.register(gc.freeze)
        state["gc_frozen_at_exit"] = True
    # MLflow prints its own "View run" link (to the GenAI view) on stdout for a server store; ours
    # (ML workflow links) are printed instead, and stdout stays clean for --format csv|md.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


# --- quick ------------------------------------------------------------------------------------


def analysis_parameters(kind: str, *extra: type) -> list[inspect.Parameter]:
    """The Typer parameters of an analysis command: every `AnalysisConfig` option, then the options of
    each class in `extra` (e.g. `FullOptions`), then the `ExecutionOptions` (shards, local or Ray), then
    the `RunOptions` (output and tracking)."""
    from sae_mlops.config import AnalysisConfig, ExecutionOptions, RunOptions
    from sae_mlops.options import typer_parameters

    out_help = {"out": f"Output directory. (default: analysis/<sae dir name>/{kind}_<UTC timestamp>)"}
    params = typer_parameters(AnalysisConfig)
    for cls in extra:
        params += typer_parameters(cls)
    params += typer_parameters(ExecutionOptions)
    return params + typer_parameters(RunOptions, overrides=out_help)


def with_signature(params: list[inspect.Parameter]) -> Callable[[F], F]:
    """Give a ``**options`` command the generated signature (Typer reads ``__signature__``)."""

    def apply(fn: F) -> F:
        fn.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        return fn

    return apply


# --- shared output ----------------------------------------------------------------------------


def show_headline(outcome: QuickOutcome, title: str) -> None:
    """The headline metrics as a table, then any warnings (on stderr)."""
    m = outcome.result.metrics
    table = Table(title=title)
    table.add_column("metric", no_wrap=True)  # the labels stay whole; a narrow terminal folds the names
    table.add_column("name", style="dim", overflow="fold")
    table.add_column("value (± 95 %)", justify="right", no_wrap=True)
    for metric in headline_metrics():
        if metric.name in m:
            table.add_row(metric.label, metric.name, format_with_interval(metric, m))
    out_console.print(table)
    if "stats/blocks" in m:
        out_console.print(f"± : half-width of the 95 % bootstrap interval over {int(m['stats/blocks'])} blocks of "
                          "windows (token-sample noise); `sae-mlops compare` pairs analyses for tighter differences.",
                          style="dim", soft_wrap=True)
    for w in outcome.warnings:
        err_console.print(f"[yellow]Warning:[/yellow] {escape(w)}", soft_wrap=True)


def show_outcome(outcome: QuickOutcome, title: str) -> None:
    """A short table of headline metrics, then where the files and the run are."""
    show_headline(outcome, title)
    out_console.print(f"Files: {outcome.out_dir}", soft_wrap=True)
    for f in outcome.files:
        out_console.print(f"  {f}", soft_wrap=True, highlight=False)
    if outcome.run_id:
        show_links(outcome.run_id)


def show_links(run_id: str) -> None:
    """Where the run is: its page, the experiment's runs list and chart view (links that open in
    the UI's ML workflow), and how to start the UI when the store is not a server."""
    import mlflow

    from sae_mlops.tracking.runs import run_links, ui_base

    links = run_links(run_id)
    base, served = ui_base()
    lines = [
        ("MLflow run:", f"{run_id}  {links['run']}"),
        ("runs list:", links["runs"]),
        ("chart view:", links["charts"] + "  (add a scatter: sparsity/l0_mean vs downstream/loss_recovered)"),
    ]
    if not served:
        lines.append(("open the UI with:", f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}  (then the links above)"))
    for label, value in lines:
        out_console.print(f"{label:<18}{value}", soft_wrap=True, highlight=False, markup=False)


def set_quiet(quiet: bool) -> None:
    if quiet:
        from sae_mlops.logging_setup import setup_logging

        setup_logging(verbose=state["verbose"], quiet=not state["verbose"])


# Command modules register themselves on `app` (they import the helpers above).
