"""`sae-mlops match A B`: match the features of two analysed SAEs (one library call:
`sae_mlops.features.match.match_analyses`, logged by `sae_mlops.tracking.features.log_match`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

from sae_mlops.commands.app import app, out_console, report_input_errors, set_quiet


@app.command()
@report_input_errors
def match(
    a: str = typer.Argument(..., help="Analysis A: output directory of `sae-mlops full`, an MLflow run id or runs:/<run_id>."),
    b: str = typer.Argument(..., help="Analysis B (same forms)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory. (default: analysis/matches/match_<UTC timestamp>)"),
    block: int = typer.Option(1024, "--block", min=1, help="Features of A per block of the cosine / correlation computation (memory: block x d_sae of B)."),
    assignment_limit: int = typer.Option(4096, "--assignment-limit", min=0, help="Largest d_sae for the one-to-one (Hungarian) assignment; above it, best matches only."),
    no_activations: bool = typer.Option(False, "--no-activations", help="Skip activation correlation even when both analyses saw the same tokens."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the decoder cosines."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log a `match` run to MLflow."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment of the match run. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="MLflow run name. (default: match <SAE A> vs <SAE B>)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Match features of two SAEs by decoder direction (and by activation correlation when both
    analyses saw the same tokens); write matched pairs, shares above 0.9 / 0.7, histograms and the
    unmatched features, and log them as a `match` run."""
    from sae_mlops.features.match import match_analyses
    from sae_mlops.features.sources import resolve_analysis
    from sae_mlops.naming import utc_timestamp

    set_quiet(quiet)
    tmp = Path(tempfile.mkdtemp(prefix="sae-mlops-match-"))
    try:  # downloaded runs (with their activation databases) are removed afterwards
        refs = [resolve_analysis(v, activation_db=not no_activations, download_to=tmp / side) for v, side in ((a, "a"), (b, "b"))]
        out_dir = out or Path("analysis") / "matches" / f"match_{utc_timestamp()}"
        result, files, inputs = match_analyses(
            refs[0].root, refs[1].root, out_dir, block=block, assignment_limit=assignment_limit,
            activations=not no_activations, device=device, given=(a, b),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = result.metrics
    out_console.print(f"Mean max decoder cosine: A->B {m['match/mean_max_cos_a_to_b']:.4f}, B->A {m['match/mean_max_cos_b_to_a']:.4f}", highlight=False)
    if "match/random_mean_max_cos_a_to_b" in m:
        out_console.print(
            f"  random directions (same d_in and widths, simulated): A->B {m['match/random_mean_max_cos_a_to_b']:.4f}, "
            f"B->A {m['match/random_mean_max_cos_b_to_a']:.4f}", highlight=False,
        )
    for t in (0.9, 0.7):
        out_console.print(f"Share with a match >= {t}: A {m[f'match/share_a_cos_ge_{t}']:.3f}, B {m[f'match/share_b_cos_ge_{t}']:.3f}", highlight=False)
    if result.activation is not None:
        out_console.print(f"Mean max activation correlation: A->B {m['match/mean_max_corr_a_to_b']:.4f}, B->A {m['match/mean_max_corr_b_to_a']:.4f}", highlight=False)
    else:
        out_console.print(f"Activation correlation not computed: {result.same_tokens_reason}", highlight=False)
    out_console.print(f"Files: {out_dir} ({len(files)} files)", soft_wrap=True, highlight=False)
    if track:
        from sae_mlops.tracking.features import log_match
        from sae_mlops.tracking.runs import run_url

        run_id = log_match(inputs, m, files, out_dir, (refs[0].run_id, refs[1].run_id), experiment, run_name)
        out_console.print(f"MLflow run: {run_id} {run_url(run_id)}", soft_wrap=True, highlight=False)


def match_compared(outcome: Any, limit: int, console: Any = out_console) -> None:
    """`compare --match`: match every pair of the compared full analyses (the newest ``limit``),
    write under ``<compare out>/matches/`` and log there in the comparison run."""
    from sae_mlops.errors import InputError
    from sae_mlops.features.match import match_many
    from sae_mlops.features.sources import resolve_analysis

    table = outcome.table
    full = table[table["kind"] == "full"].sort_values("start_time").tail(limit)
    if len(full) < 2:
        raise InputError(f"--match needs at least two full analyses among the compared runs; found {len(full)}. Run `sae-mlops full` on another SAE first.")
    tmp = Path(tempfile.mkdtemp(prefix="sae-mlops-compare-match-"))
    try:
        roots = [(f"{r.label} ({r.run_id[:6]})", resolve_analysis(r.run_id, activation_db=True, download_to=tmp / r.run_id).root) for r in full.itertuples()]
        out_dir = Path(outcome.out_dir) / "matches"
        matrix, files = match_many(roots, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print("Mean max decoder cosine (row -> column):", highlight=False)
    console.print(matrix.round(3).to_string(), soft_wrap=True, highlight=False)
    if outcome.run_id:
        from sae_mlops.tracking.features import log_to_analysis_run

        log_to_analysis_run(outcome.run_id, files, out_dir, "matches", {"compare/match_pairs": len(full) * (len(full) - 1) / 2})
        console.print(f"Matches logged to MLflow run {outcome.run_id} under matches/", soft_wrap=True, highlight=False)
