"""`sae-mlops probe` and `sae-mlops evals`: k-sparse probing alone, or a suite of evals (core analysis,
probing, absorption, auto-interpretability) on one SAE logged to one MLflow run. Both signatures are
generated from the option declarations in `sae_mlops.config`; each command makes one library call."""

from __future__ import annotations

import inspect
import math
from typing import Any

from rich.table import Table

from sae_mlops.commands.app import app, out_console, report_input_errors, set_quiet, with_signature


def probe_parameters() -> list[inspect.Parameter]:
    from sae_mlops.config import EvalRunOptions, EvalTarget, ProbeOptions
    from sae_mlops.options import typer_parameters

    return typer_parameters(EvalTarget) + typer_parameters(ProbeOptions) + typer_parameters(EvalRunOptions)


def evals_parameters() -> list[inspect.Parameter]:
    from sae_mlops.config import AbsorptionOptions, AnalysisConfig, AutointerpOptions, EvalRunOptions, EvalsOptions, ProbeOptions
    from sae_mlops.options import typer_parameters

    params: list[inspect.Parameter] = []
    for cls in (AnalysisConfig, EvalsOptions, ProbeOptions, AbsorptionOptions, AutointerpOptions, EvalRunOptions):
        params += typer_parameters(cls)
    return params


def _show(outcome: Any, title: str) -> None:
    from sae_mlops.metrics import lookup

    m = outcome.metrics
    table = Table(title=title, show_lines=False)
    for col in ("metric", "value", "95 % interval"):
        table.add_column(col)
    for name in sorted(m):
        if "_ci_" in name or name.count("/") != 1 or name.startswith(("time/", "label/")):
            continue
        meta = lookup(name)
        fmt = meta.format if meta else (lambda v: f"{v:.4g}")
        lo, hi = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
        ci = f"[{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None and math.isfinite(lo) else ""
        table.add_row(meta.label if meta else name, fmt(m[name]), ci)
    out_console.print(table)
    for ev, msg in outcome.messages.items():
        out_console.print(f"{ev}: {msg}.", soft_wrap=True, highlight=False)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items())
    out_console.print(f"Seconds: {secs}; activation cache {outcome.cache_hits} hit(s), {outcome.cache_misses} miss(es). "
                      f"Files under {outcome.out_dir}", soft_wrap=True, highlight=False)
    if outcome.run_id:
        out_console.print(f"Logged to MLflow run {outcome.run_id}", soft_wrap=True, highlight=False)


@app.command()
@report_input_errors
@with_signature(probe_parameters())
def probe(**options: Any) -> None:
    """k-sparse probing of one SAE on labelled datasets: logistic-regression probes on the top-k latents
    (k = 1, 2, 5, ...) against the same probes on the raw activations (top-k dimensions and all of them).

    Pooled hook activations are cached on disk (per model, hook, dataset and pooling), so probing
    several SAEs of one hook runs the model once."""
    from sae_mlops.config import EvalRunOptions, EvalTarget, ProbeOptions
    from sae_mlops.options import build
    from sae_mlops.workflows import run_probe_and_log

    run = build(EvalRunOptions, options)
    set_quiet(run.quiet)
    outcome = run_probe_and_log(build(EvalTarget, options), build(ProbeOptions, options), run)
    _show(outcome, f"k-sparse probing: {options['sae']}")


@app.command()
@report_input_errors
@with_signature(evals_parameters())
def evals(**options: Any) -> None:
    """Run a suite of evals on one SAE and log everything to one MLflow run: core (the quick analysis,
    or the full one when autointerp is asked), probe (k-sparse probing), absorption (first-letter
    feature absorption) and autointerp (LLM labels scored by detection)."""
    from sae_mlops.config import AbsorptionOptions, AnalysisConfig, AutointerpOptions, EvalRunOptions, EvalsOptions, ProbeOptions
    from sae_mlops.options import build
    from sae_mlops.workflows import run_evals_and_log

    run = build(EvalRunOptions, options)
    set_quiet(run.quiet)
    outcome = run_evals_and_log(build(AnalysisConfig, options, progress=not run.quiet), build(EvalsOptions, options),
                                build(ProbeOptions, options), build(AbsorptionOptions, options),
                                build(AutointerpOptions, options), run)
    _show(outcome, f"Evals: {options['sae']}")
