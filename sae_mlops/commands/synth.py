"""`sae-mlops synth`: a synthetic world with known features, a grid of SAE recipes trained on it and
scored against the truth, and the report of which proxy metrics track it. One library call:
`sae_mlops.training.synth.synth_and_log`."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from rich.table import Table

from sae_mlops.commands.app import app, out_console, report_input_errors, set_quiet, show_links, with_signature
from sae_mlops.config import SynthConfig, SynthRunOptions


def _synth_parameters() -> list[inspect.Parameter]:
    from sae_mlops.options import typer_parameters

    return typer_parameters(SynthConfig) + typer_parameters(SynthRunOptions)


@app.command()
@report_input_errors
@with_signature(_synth_parameters())
def synth(**options: Any) -> None:
    """Train a grid of SAE recipes on a synthetic world with known features (sae_lens.synthetic) and
    score each against the truth (MCC, uniqueness, precision/recall/F1): one MLflow training run per
    recipe, the world logged once, and a report of which proxy metrics track the truth."""
    from sae_mlops.options import build
    from sae_mlops.training.synth import synth_and_log
    from sae_mlops.workflows import preflight

    run = build(SynthRunOptions, options)
    set_quiet(run.quiet)
    preflight(Path(run.out) if run.out else None, track=True)
    cfg = build(SynthConfig, options)
    outcome = synth_and_log(cfg, run.out, experiment=run.experiment)
    table = Table(title=f"Synth grid on world {outcome.digest} (best MCC first)")
    for col in ("recipe", "MCC", "F1", "explained var.", "L0", "dead frac."):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    df = outcome.table.sort_values("synth/mcc", ascending=False)
    for name, row in df.iterrows():
        table.add_row(str(name), f"{row['synth/mcc']:.4f}", f"{row['synth/f1']:.4f}", f"{row['synth/explained_variance']:.4f}",
                      f"{row['synth/l0']:.2f}", f"{row['synth/dead_fraction']:.3f}")
    out_console.print(table)
    agreeing = ", ".join(outcome.facts["agreeing_proxies"]) or "none"
    out_console.print(
        f"Winner on MCC: {outcome.facts['winner_mcc']}; proxies that would have picked it: {agreeing}. "
        f"{len(df)} recipes in {outcome.seconds:.0f} s; world {'reused from' if outcome.world_reused else 'logged as'} run "
        f"{outcome.world_run_id}.",
        soft_wrap=True, highlight=False,
    )
    out_console.print(f"Report: {outcome.report / 'README.html'}", soft_wrap=True, highlight=False)
    show_links(outcome.grid_run_id)
