"""`sae-mlops quick`, `sae-mlops full`, `sae-mlops demo` and `sae-mlops db query`: the analyses and
the activation database a full analysis writes.

`full` takes every option of `quick` by construction: both signatures are generated from the option
declarations (`AnalysisConfig`, `FullOptions`, `RunOptions` in `sae_mlops.config`).
"""

from __future__ import annotations

import logging
import numbers
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from sae_mlops.commands.app import (
    analysis_parameters,
    app,
    err_console,
    out_console,
    report_input_errors,
    set_quiet,
    show_headline,
    show_links,
    show_outcome,
    with_signature,
)
from sae_mlops.config import ExecutionOptions, FullOptions
from sae_mlops.errors import InputError
from sae_mlops.metrics import BY_NAME, format_with_interval

if TYPE_CHECKING:
    import pandas as pd

    from sae_mlops.workflows import FullOutcome, QuickOutcome


log = logging.getLogger("sae_mlops.cli")


# --- quick ------------------------------------------------------------------------------------


DEMO_EXPERIMENT = "sae-mlops-demo"
DEMO_KINDS = ("standard", "batchtopk", "saelens")
DEMO_MAX_TOKENS = 100_000  # keeps `make demo` to a few minutes on a laptop CPU


@app.command()
@report_input_errors
@with_signature(analysis_parameters("quick"))
def quick(**options: Any) -> None:
    """Quick analysis of one SAE: sparsity, dead/rare/dense features, reconstruction, CE/KL downstream.

    One streaming pass over at most --max-tokens tokens. Writes a results JSON and a readable
    summary under --out and logs params, metrics, lineage tags and those files to MLflow
    (MLFLOW_TRACKING_URI, else MLflow's default local store).
    """
    from sae_mlops.config import AnalysisConfig, RunOptions
    from sae_mlops.options import build
    from sae_mlops.workflows import run_quick_and_log

    run = build(RunOptions, options)
    set_quiet(run.quiet)
    cfg = build(AnalysisConfig, options, progress=not run.quiet)
    execution = build(ExecutionOptions, options)
    outcome = run_quick_and_log(cfg, run.out, track=not run.no_track, experiment=run.experiment, run_name=run.run_name,
                                exec_opts=execution, resume=run.resume)
    show_outcome(outcome, title=f"Quick analysis: {cfg.sae}")


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
    from sae_mlops.workflows import run_quick_and_log

    set_quiet(quiet)
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
        outcome = run_quick_and_log(cfg, track=not no_track, experiment=experiment)
        outcomes.append((kind, outcome))
        show_outcome(outcome, title=f"Demo SAE: {kind}")

    summary = Table(title="Demo results (± half-width of the 95 % interval)")
    summary.add_column("SAE")
    shown = [BY_NAME[n] for n in ("sparsity/l0_mean", "recon/explained_variance", "downstream/loss_recovered")]
    for metric in shown:
        summary.add_column(metric.label.split(" (")[0], justify="right")
    for kind, o in outcomes:
        summary.add_row(kind, *[format_with_interval(metric, o.result.metrics) for metric in shown])
    out_console.print(summary)
    if len(outcomes) > 1 and any(o.run_id for _, o in outcomes):
        out_console.print(f"Which differences are real: sae-mlops compare -e {experiment}", soft_wrap=True, highlight=False)
    for kind, o in outcomes:
        run = f"MLflow run {o.run_id}" if o.run_id else "not tracked"
        out_console.print(f"{kind}: results in {o.out_dir} ({run})", soft_wrap=True, highlight=False)
    tracked = [o for _, o in outcomes if o.run_id]
    if tracked:
        out_console.print(f"Runs are in MLflow experiment '{experiment}' at {tracked[-1].tracking_uri}", soft_wrap=True, highlight=False)
        show_links(str(tracked[-1].run_id))



# --- full -------------------------------------------------------------------------------------


@app.command()
@report_input_errors
@with_signature(analysis_parameters("full", FullOptions))
def full(**options: Any) -> None:
    """Full analysis of one SAE: everything quick measures, plus per-feature examples, the activation
    database, similarity and co-occurrence matrices, logit lens, feature summaries, plots and reports.

    One streaming pass over at most --max-tokens tokens. Writes the prior tool's layout under --out
    (activation_database/, matrices/, plots/, results/, SUMMARY.json, README.md) and logs
    params, metrics (the same names as quick), lineage tags and every file to MLflow. Query the
    activation database afterwards with `sae-mlops db query OUT_DIR ...`.
    """
    from sae_mlops.config import AnalysisConfig, RunOptions
    from sae_mlops.options import build
    from sae_mlops.workflows import run_full_and_log

    run = build(RunOptions, options)
    set_quiet(run.quiet)
    cfg = build(AnalysisConfig, options, progress=not run.quiet)
    opts = build(FullOptions, options)
    execution = build(ExecutionOptions, options)
    outcome = run_full_and_log(
        cfg, run.out, opts=opts, track=not run.no_track, experiment=run.experiment, run_name=run.run_name,
        exec_opts=execution, resume=run.resume,
    )
    show_full_outcome(outcome, title=f"Full analysis: {cfg.sae}")


def show_full_outcome(outcome: FullOutcome, title: str) -> None:
    """The headline metrics, then where the main files, the database and the run are."""
    show_headline(outcome, title)

    def line(label: str, value: Any) -> None:
        out_console.print(f"{label:<20}{value}", soft_wrap=True, highlight=False, markup=False)

    line("Files:", f"{outcome.out_dir} ({len(outcome.files)} files)")
    if outcome.summary:
        line("  summary:", outcome.summary)
    if outcome.report:
        line("  report:", outcome.report)
    if outcome.database:
        line("  activation DB:", outcome.database)
        line("  query it with:", f"sae-mlops db query {outcome.out_dir} --feature 0")
    if outcome.run_id:
        show_links(outcome.run_id)


# --- db query ---------------------------------------------------------------------------------

db_app = typer.Typer(
    name="db",
    help="Query the activation database a full analysis wrote (DuckDB over its Parquet files).",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(db_app, name="db")


class OutFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


QUESTIONS = "--feature F, --token I, --doc D --position P, --doc D, --feature-docs F or --sql QUERY"


@db_app.command("query")
@report_input_errors
def query(
    path: Path = typer.Argument(
        ...,
        help="An activation database directory (activation_database/activation_db), or an analysis output directory: "
        "the newest complete database under it is used.",
        metavar="PATH",
        show_default=False,
    ),
    feature: Optional[int] = typer.Option(None, "--feature", help="Top activations of feature F, each with its context (the token marked [[like this]])."),
    top: Optional[int] = typer.Option(None, "--top", help="With --feature: how many top activations. (default: --limit, or 25 with --limit 0)"),
    context: Optional[int] = typer.Option(None, "--context", help="With --feature: tokens of context either side. (default: 10)"),
    token: Optional[int] = typer.Option(None, "--token", help="Features active on the token with this global token index (token_index)."),
    doc: Optional[int] = typer.Option(None, "--doc", help="Features that fired in document D; with --position P, features active on that token."),
    position: Optional[int] = typer.Option(None, "--position", help="With --doc: the token's position in the document."),
    feature_docs: Optional[int] = typer.Option(None, "--feature-docs", help="Firing counts of feature F per document."),
    sql: Optional[str] = typer.Option(None, "--sql", help="One read-only DuckDB SELECT (or WITH ... SELECT) over the views tokens, activations, features and vocab; no other statement, no file outside the database directory."),
    limit: int = typer.Option(20, "--limit", help="Rows shown; 0 shows all."),
    fmt: OutFormat = typer.Option(OutFormat.table, "--format", case_sensitive=False, help="table (for reading), csv or json (on stdout, for piping)."),
) -> None:
    """Ask one question of an activation database: top activations of a feature, the features on a
    token or in a document, a feature's firing counts per document, or your own SQL.

    Examples: `sae-mlops db query OUT --feature 12 --top 10`, `... --doc 3 --position 17`,
    `... --sql "SELECT feature, firing_count FROM features ORDER BY firing_count DESC" --format csv`.
    """
    _check_question(feature=feature, top=top, context=context, token=token, doc=doc, position=position, feature_docs=feature_docs, sql=sql, limit=limit)
    if not path.exists():
        raise InputError(f"'{path}' does not exist; give an activation database directory or the output directory of `sae-mlops full`.")
    from sae_mlops.outputs.activation_db.reader import ActivationDB

    db = ActivationDB(path)
    title, df = _answer(db, feature=feature, top=top, context=context, token=token, doc=doc, position=position, feature_docs=feature_docs, sql=sql, limit=limit)
    _show(df, title, fmt, limit, db.root)


def _check_question(**q: Any) -> None:
    if q["position"] is not None and q["doc"] is None:
        raise InputError("--position goes with --doc: name a token by --doc D --position P, or by --token I.")
    for opt in ("top", "context"):
        if q[opt] is not None and q["feature"] is None:
            raise InputError(f"--{opt} goes with --feature (top activations of a feature).")
    asked = [
        name
        for name, key in (("--feature", "feature"), ("--token", "token"), ("--doc", "doc"), ("--feature-docs", "feature_docs"), ("--sql", "sql"))
        if q[key] is not None
    ]
    if not asked:
        raise InputError(f"ask one question: {QUESTIONS}.")
    if len(asked) > 1:
        raise InputError(f"ask one question per call, not {' and '.join(asked)}; the questions are {QUESTIONS}.")
    for opt in ("feature", "token", "doc", "position", "feature_docs", "context", "limit"):
        if q[opt] is not None and q[opt] < 0:
            raise InputError(f"--{opt.replace('_', '-')} must be 0 or more, got {q[opt]}.")
    if q["top"] is not None and q["top"] < 1:
        raise InputError(f"--top must be at least 1, got {q['top']}.")
    if q["sql"] is not None and not q["sql"].strip():
        raise InputError("--sql is empty; give a SELECT over the views tokens, activations, features and vocab.")


def _answer(db: Any, **q: Any) -> tuple[str, pd.DataFrame]:
    """(title, rows) for the one question asked (already checked by `_check_question`)."""
    n_tokens = int(db.manifest["n_tokens"])
    d_sae = int(db.manifest["d_sae"])
    if q["feature"] is not None or q["feature_docs"] is not None:
        f = q["feature"] if q["feature"] is not None else q["feature_docs"]
        if f >= d_sae:
            raise InputError(f"feature {f} is out of range; this SAE has features 0..{d_sae - 1}.")
    if q["feature"] is not None:
        k = q["top"] or q["limit"] or 25
        ctx = 10 if q["context"] is None else q["context"]
        return f"Top {k} activations of feature {q['feature']} (context ±{ctx} tokens)", db.top_activations(q["feature"], k, ctx)
    if q["feature_docs"] is not None:
        return f"Documents where feature {q['feature_docs']} fired", db.document_counts(q["feature_docs"])
    if q["token"] is not None:
        if q["token"] >= n_tokens:
            raise InputError(f"token {q['token']} is out of range; this database has tokens 0..{n_tokens - 1}.")
        return f"Features active on token {q['token']}", db.features_on_token(token_index=q["token"])
    if q["doc"] is not None:
        _check_document(db, q["doc"])
        if q["position"] is not None:
            return f"Features active on document {q['doc']}, position {q['position']}", db.features_on_token(doc=q["doc"], position=q["position"])
        return f"Features that fired in document {q['doc']}", db.features_in_document(q["doc"])
    import duckdb

    try:
        return "SQL", db.sql(q["sql"])
    except duckdb.Error as e:
        raise InputError(f"the SQL query failed: {e}") from None


def _check_document(db: Any, doc: int) -> None:
    if int(db.sql("SELECT count(*) AS n FROM tokens WHERE doc_index = ?", [doc]).n[0]):
        return
    seen = db.sql("SELECT count(DISTINCT doc_index) AS docs, min(doc_index) AS lo, max(doc_index) AS hi FROM tokens").iloc[0]
    raise InputError(
        f"document {doc} has no analysed tokens in this database ({int(seen.docs)} documents, indices {int(seen.lo)}..{int(seen.hi)}, were analysed)."
    )


def _show(df: pd.DataFrame, title: str, fmt: OutFormat, limit: int, root: Path) -> None:
    total = len(df)
    shown = df.head(limit) if limit else df
    if fmt is OutFormat.csv:
        typer.echo(shown.to_csv(index=False), nl=False)
    elif fmt is OutFormat.json:
        typer.echo(shown.to_json(orient="records", force_ascii=False))
    else:
        out_console.print(Text(title, style="bold"))
        out_console.print(_table(shown) if total else "No rows.", highlight=False)
        out_console.print(Text(f"database: {root}", style="dim"), soft_wrap=True)
    if len(shown) < total:
        err_console.print(f"Showing {len(shown)} of {total} rows; --limit N shows more (0 = all).", highlight=False, style="dim")


def _table(df: pd.DataFrame) -> Table:
    import pandas as pd

    table = Table()
    for col in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[col])
        table.add_column(str(col), justify="right" if numeric else "left", overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*(_cell(col, v) for col, v in zip(df.columns, row, strict=True)))
    return table


def _cell(col: str, v: Any) -> Text:
    """Rich text for one value: floats to 4 significant figures, newlines visible, the marked token bold."""
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        return Text(f"{v:.4g}")
    if not isinstance(v, str):
        return Text(str(v))
    text = Text(v.replace("\n", "\\n"))
    if col == "context":
        text.highlight_regex(r"\[\[.*?\]\]", "bold")
    return text

