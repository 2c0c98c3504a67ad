"""Quick-analysis outputs: a results JSON, per-feature statistics (Parquet) and a readable summary.

Pure functions of an :class:`AnalysisResult`: no model, no MLflow. Layout under ``out_dir``::

    results/analysis_results.json   params, metrics (the numbers MLflow logs), tags, warnings
    results/feature_stats.parquet   feature, firing_count, frequency, mean_activation, max_activation
    SUMMARY.md                      the headline figures for people

File names are stable (no timestamp), so runs share artifact names and MLflow's compare view can
show them side by side; when the analysis finished is in the results JSON (``details.finished_at``)
and the run's tag ``sae_mlops.finished_at``. Markdown table cells are escaped (`md_cell`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from sae_mlops.metrics import interval_of, summary_metrics
from sae_mlops.core.results import AnalysisResult
from sae_mlops.files import atomic_write, atomic_write_text

def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S", time.gmtime())


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e12):
        return f"{int(value):,}"
    return f"{value:.4g}"


def md_cell(text: str) -> str:
    """Text safe in a markdown table cell: ``|`` escaped (``||`` in "KL(clean || SAE)" would split the
    row), newlines as spaces."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def summary_markdown(result: AnalysisResult) -> str:
    p = result.params
    lines = [
        f"# SAE {result.kind} analysis: {result.details.get('sae_name', p.get('sae'))}",
        "",
        f"- SAE: `{p.get('sae')}` ({p.get('sae_format')}, {p.get('sae_architecture')}, d_in {p.get('d_in')}, "
        f"d_sae {p.get('d_sae')})",
        f"- model: `{p.get('model')}`, hook `{p.get('hook')}`",
        f"- corpus: `{p.get('corpus')}` ({p.get('corpus_documents')} documents), context {p.get('context_size')}, "
        f"BOS {'prepended' if p.get('prepend_bos') else 'not prepended'}",
    ]
    if p.get("topk_mode"):
        lines.append(f"- BatchTopK: k={p.get('topk_k')}, mode `{p.get('topk_mode')}`, theta {fmt(p.get('topk_threshold'))}")
    lines += ["", "| metric | value | 95 % interval | unit |", "|---|---:|---:|---|"]
    for metric in summary_metrics():
        key, label, unit = metric.name, metric.label, metric.unit
        if key in result.metrics:
            ci = interval_of(result.metrics, key)
            interval = f"{metric.format(ci[0])} to {metric.format(ci[1])}" if ci else ""
            lines.append(f"| {md_cell(label)} | {md_cell(fmt(result.metrics[key]))} | {md_cell(interval)} | {md_cell(unit)} |")
    iv = result.details.get("intervals")
    if iv:
        lines += ["", f"Intervals: 95 % percentile bootstrap over {iv['blocks']} blocks of whole windows "
                  f"({iv['resamples']} resamples, seed {iv['seed']}), each metric recomputed from resampled sums; "
                  "they cover the token-sample noise, not the training seed's (see `sae-mlops compare`)."]
    if result.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    lines += ["", "Metric definitions: see the metric table of the sae-mlops documentation (docs/guides/quick.md).", ""]
    return "\n".join(lines)


def write_feature_stats(result: AnalysisResult, path: Path) -> Path:
    frame = pd.DataFrame(result.per_feature)
    frame.insert(0, "feature", range(len(frame)))
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_quick_outputs(result: AnalysisResult, out_dir: Path) -> list[Path]:
    """Write the quick-analysis files under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    files = [atomic_write_text(out_dir / "results" / "analysis_results.json", result.to_json())]
    if result.per_feature:
        files.append(write_feature_stats(result, out_dir / "results" / "feature_stats.parquet"))
    files.append(atomic_write_text(out_dir / "SUMMARY.md", summary_markdown(result)))
    files += write_block_sums(result, out_dir)
    return files


def write_block_sums(result: AnalysisResult, out_dir: Path) -> list[Path]:
    """``results/blocks.safetensors`` + ``results/blocks.json``: the per-block sums behind the
    intervals, which `sae-mlops compare` pairs block by block (nothing when the pass kept none)."""
    if result.block_sums is None:
        return []
    return list(result.block_sums.save(Path(out_dir) / "results"))
