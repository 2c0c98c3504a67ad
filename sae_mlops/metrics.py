"""The metric registry: one row per metric an analysis reports.

Every place that shows or judges a metric reads this table: the CLI's headline table, the SUMMARY and
README writers, `compare` (its columns and Pareto plots), the service's version tags and quality gate,
and the MLflow run description. Definitions (formulas) are in the metric table of docs/guides/quick.md and in the
collectors' docstrings; here is how each is named, shown and judged.

name: the results / MLflow metric name (``group/name``); short: the short name used in version tags,
the quality gate and `compare` columns (None: none); label: for people; unit: of the value;
higher_is_better: True / False, None when neither (a count, a CE value); fmt: Python format for one
value; saelens: the SAELens ``run_evals`` key of the same quantity, when it has one; headline: shown
in the CLI's headline table and in run descriptions' first line; summary: a row of SUMMARY.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """How one metric is named, shown and judged (see the module docstring for each field)."""

    name: str
    label: str
    unit: str
    fmt: str
    higher_is_better: bool | None = None
    short: str | None = None
    saelens: str | None = None
    headline: bool = False
    summary: bool = True

    def format(self, value: Any) -> str:
        """`value` with this metric's format; 'n/a' for None or NaN."""
        return format_value(value, self.fmt)


def format_value(value: Any, pattern: str) -> str:
    """`value` formatted with `pattern`: 'n/a' for None or NaN; str(value) where the pattern does not apply."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return str(value)


METRICS: tuple[Metric, ...] = (
    Metric("tokens/analysed", "tokens analysed (non-special)", "tokens", "{:,.0f}", short="tokens", headline=True),
    Metric("sparsity/l0_mean", "L0 mean (active features per token)", "features", "{:.2f}", False, "l0",
           "sparsity/l0", headline=True),
    Metric("sparsity/l0_std", "L0 std", "features", "{:.2f}"),
    Metric("sparsity/l1_mean", "L1 mean (sum |f| per token)", "activation", "{:.4g}", None, None, "sparsity/l1",
           headline=True),
    Metric("sparsity/l1_std", "L1 std", "activation", "{:.4g}", summary=False),
    Metric("features/dead_count", "dead features (never fired)", "features", "{:,.0f}", False, headline=True),
    Metric("features/dead_fraction", "dead fraction", "of d_sae", "{:.4f}", False, "dead_fraction", headline=True),
    Metric("features/rare_count", "rare features", "features", "{:,.0f}", False),
    Metric("features/rare_fraction", "rare fraction", "of d_sae", "{:.4f}", False, summary=False),
    Metric("features/dense_count", "dense features", "features", "{:,.0f}", False, headline=True),
    Metric("features/dense_fraction", "dense fraction", "of d_sae", "{:.4f}", False, "dense_fraction", summary=False),
    Metric("features/alive_count", "alive features", "features", "{:,.0f}", True, summary=False),
    Metric("features/train_dead_count", "dead at training time (ever_fired)", "features", "{:,.0f}", False),
    Metric("recon/mse_per_token", "MSE per token (sum over dims)", "act^2", "{:.4g}", False, "mse_per_token",
           "reconstruction_quality/mse", headline=True),
    Metric("recon/mse_per_element", "MSE per element", "act^2", "{:.4g}", False),
    Metric("recon/explained_variance", "explained variance (per-dim, about the mean)", "fraction", "{:.4f}", True,
           "explained_variance", "reconstruction_quality/explained_variance", headline=True),
    Metric("recon/explained_variance_pooled", "explained variance, pooled (prior tool's)", "fraction", "{:.4f}", True),
    Metric("recon/cosine", "cosine(x, x_hat)", "", "{:.4f}", True, "cosine", "reconstruction_quality/cossim",
           headline=True),
    Metric("recon/l2_ratio", "L2 ratio ||x_hat|| / ||x||", "ratio", "{:.4f}", None, None, "shrinkage/l2_ratio"),
    Metric("recon/relative_reconstruction_bias", "relative reconstruction bias", "ratio", "{:.4f}", None, None,
           "shrinkage/relative_reconstruction_bias", summary=False),
    Metric("downstream/ce_clean", "CE clean", "nats", "{:.4f}", None, "ce_clean",
           "model_performance_preservation/ce_loss_without_sae", headline=True),
    Metric("downstream/ce_sae", "CE with SAE spliced in", "nats", "{:.4f}", False, "ce_sae",
           "model_performance_preservation/ce_loss_with_sae", headline=True),
    Metric("downstream/ce_zero", "CE with hook zero-ablated", "nats", "{:.4f}", None, "ce_zero",
           "model_performance_preservation/ce_loss_with_ablation", headline=True),
    Metric("downstream/loss_recovered", "loss recovered", "fraction", "{:.4f}", True, "loss_recovered",
           "model_performance_preservation/ce_loss_score", headline=True),
    Metric("downstream/kl_sae", "KL(clean || SAE)", "nats", "{:.4g}", False, "kl_sae",
           "model_behavior_preservation/kl_div_with_sae", headline=True),
    Metric("downstream/kl_zero", "KL(clean || zero)", "nats", "{:.4g}", None, None,
           "model_behavior_preservation/kl_div_with_ablation"),
    Metric("downstream/kl_score", "KL score", "fraction", "{:.4f}", True, "kl_score",
           "model_behavior_preservation/kl_div_score", summary=False),
    Metric("tokens/predictions", "next-token predictions", "count", "{:,.0f}", summary=False),
    Metric("tokens/windows", "windows", "count", "{:,.0f}", summary=False),
    Metric("tokens/batches", "batches", "count", "{:,.0f}", summary=False),
    Metric("speed/seconds", "pass wall time", "s", "{:.1f}", False, summary=False),
    Metric("speed/tokens_per_s", "throughput", "tokens/s", "{:,.0f}", True, headline=True),
    # cost telemetry (sae_mlops.telemetry): where the run's time and memory went
    Metric("time/startup", "start-up (interpreter, imports)", "s", "{:,.1f}", False, summary=False),
    Metric("time/import", "imports of model/SAE libraries", "s", "{:,.1f}", False, summary=False),
    Metric("time/load", "loading SAE, corpus and model", "s", "{:,.1f}", False, summary=False),
    Metric("time/pass", "the streaming pass", "s", "{:,.1f}", False, summary=False),
    Metric("time/plan", "cutting the corpus into shards", "s", "{:,.1f}", False, summary=False),
    Metric("time/ray_start", "waiting for the local Ray instance (or connecting to a cluster)", "s", "{:,.1f}", False,
           summary=False),
    Metric("time/ray_actor_startup", "Ray actors loading model and SAE", "s", "{:,.1f}", False, summary=False),
    Metric("time/ray_shards", "Ray shards wall time (after start-up)", "s", "{:,.1f}", False, summary=False),
    Metric("time/database", "activation database", "s", "{:,.1f}", False, summary=False),
    Metric("time/matrices", "matrices and neighbour lists", "s", "{:,.1f}", False, summary=False),
    Metric("time/logit_lens", "logit lens", "s", "{:,.1f}", False, summary=False),
    Metric("time/summaries", "feature summaries", "s", "{:,.1f}", False, summary=False),
    Metric("time/plots", "plots", "s", "{:,.1f}", False, summary=False),
    Metric("time/reports", "reports", "s", "{:,.1f}", False, summary=False),
    Metric("time/logging", "MLflow logging", "s", "{:,.1f}", False, summary=False),
    Metric("time/total", "total seconds (process start to end)", "s", "{:,.1f}", False, headline=True, summary=False),
    Metric("time/pass_share", "share of the total in the pass", "fraction", "{:.0%}", True, headline=True, summary=False),
    Metric("memory/peak_rss_mib", "peak resident memory", "MiB", "{:,.0f}", False, summary=False),
    Metric("memory/peak_gpu_mib", "peak GPU memory (torch)", "MiB", "{:,.0f}", False, summary=False),
    Metric("memory/worker_peak_rss_mib", "largest Ray actor peak memory", "MiB", "{:,.0f}", False, summary=False),
    Metric("progress/tokens_done", "tokens done (while running)", "tokens", "{:,.0f}", True, summary=False),
    Metric("progress/fraction", "fraction done (while running)", "fraction", "{:.0%}", True, summary=False),
    Metric("artifacts/bytes", "bytes written", "bytes", "{:,.0f}", False, summary=False),
    # intervals (sae_mlops.core.intervals): each metric above that the per-block sums determine also has
    # <name>_ci_low / <name>_ci_high, the bounds of its 95 % bootstrap interval (see ci_names)
    Metric("stats/blocks", "blocks of windows (bootstrap unit)", "blocks", "{:,.0f}", summary=False),
    Metric("time/intervals", "bootstrap intervals", "s", "{:,.1f}", False, summary=False),
    # ground truth on a synthetic world (sae_mlops.training.synth; sae_lens.synthetic.eval_sae_on_synthetic_data)
    Metric("synth/mcc", "MCC vs true features (Hungarian-matched |cos|)", "cosine", "{:.4f}", True, "synth_mcc", summary=False),
    Metric("synth/uniqueness", "feature uniqueness (distinct true features / latents)", "fraction", "{:.4f}", True, summary=False),
    Metric("synth/f1", "mean F1 of latents as detectors of their true feature", "fraction", "{:.4f}", True, "synth_f1",
           summary=False),
    Metric("synth/precision", "mean precision (when a latent fires, its true feature fires)", "fraction", "{:.4f}", True,
           summary=False),
    Metric("synth/recall", "mean recall (when a true feature fires, its latent fires)", "fraction", "{:.4f}", True, summary=False),
    Metric("synth/accuracy", "mean detection accuracy", "fraction", "{:.4f}", True, summary=False),
    Metric("synth/dead_latents", "dead latents on the eval samples", "features", "{:,.0f}", False, summary=False),
    Metric("synth/dead_fraction", "dead fraction on the eval samples", "of d_sae", "{:.4f}", False, summary=False),
    Metric("synth/shrinkage", "shrinkage (mean ||x_hat|| / ||x||)", "ratio", "{:.4f}", None, summary=False),
    Metric("synth/explained_variance", "explained variance on the world", "fraction", "{:.4f}", True, summary=False),
    Metric("synth/l0", "L0 on the world", "features", "{:.2f}", False, summary=False),
    Metric("synth/true_l0", "true L0 (true features firing per sample)", "features", "{:.2f}", None, summary=False),
    Metric("synth/mse", "MSE per sample (sum over dims) on the world", "act^2", "{:.4g}", False, summary=False),
    Metric("synth/cosine", "cosine(x, x_hat) on the world", "", "{:.4f}", True, summary=False),
    Metric("synth/train_loss", "final training loss", "loss", "{:.4g}", False, summary=False),
    Metric("synth/train_seconds", "training time of the recipe", "s", "{:.1f}", False, summary=False),
    Metric("synth/baseline_frozen_change", "largest change of a baseline's frozen part (soft: min cosine)", "", "{:.3g}",
           None, summary=False),
    Metric("synth/recipes", "recipes in the synth grid", "count", "{:,.0f}", None, summary=False),
    Metric("synth/grid_seconds", "synth grid wall time (world, training, scoring)", "s", "{:.1f}", False, summary=False),
)

#: Proxies whose rank correlation with the truth the synth report gives (``synth/rho_<truth>_vs_<proxy>``).
SYNTH_PROXIES = ("synth/explained_variance", "synth/mse", "synth/cosine", "synth/l0", "synth/dead_fraction",
                 "synth/shrinkage", "synth/train_loss")
SYNTH_TRUTHS = ("synth/mcc", "synth/f1")
METRICS = METRICS + tuple(
    Metric(f"synth/rho_{t.split('/')[1]}_vs_{p.split('/')[1]}", f"Spearman rho of {p} with {t} across the grid", "rho",
           "{:+.3f}", None, summary=False)
    for t in SYNTH_TRUTHS for p in SYNTH_PROXIES
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
BY_SHORT: dict[str, Metric] = {m.short: m for m in METRICS if m.short}
#: Extra short names accepted where a short name is (the service's quality gate, tags).
ALIASES: dict[str, str] = {"l0_mean": "sparsity/l0_mean"}


def lookup(name: str) -> Metric | None:
    """The metric for a full name (``recon/cosine``), a short name (``cosine``) or an alias; None if unknown."""
    if name in BY_NAME:
        return BY_NAME[name]
    if name in BY_SHORT:
        return BY_SHORT[name]
    return BY_NAME.get(ALIASES.get(name, "")) or eval_metric(name)


def full_name(name: str) -> str:
    """The results' metric name for a short or full name (unknown names unchanged)."""
    m = lookup(name)
    return m.name if m else name


def headline_metrics() -> list[Metric]:
    """The CLI headline table's rows, in order."""
    return [m for m in METRICS if m.headline]


def summary_metrics() -> list[Metric]:
    """SUMMARY.md's rows, in order."""
    return [m for m in METRICS if m.summary]


#: The one-line headline of a run (its description's first line, the version tags): short name -> label.
HEADLINE_LINE = {"l0": "L0", "loss_recovered": "loss recovered", "explained_variance": "explained variance",
                 "dead_fraction": "dead fraction"}


def headline_line(metrics: dict[str, Any], bold: bool = False) -> str:
    """One line for people: ``L0 12.34 · loss recovered 0.9512 · explained variance 0.8700 · dead
    fraction 0.0100`` (values in Markdown bold when `bold`); absent or non-finite metrics are left out."""
    parts = []
    for short, label in HEADLINE_LINE.items():
        m = BY_SHORT[short]
        v = metrics.get(m.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            value = m.format(float(v))
            ci = interval_of(metrics, m.name)
            pm = f" ± {m.format((ci[1] - ci[0]) / 2.0)}" if ci else ""
            parts.append(f"{label} **{value}**{pm}" if bold else f"{label} {value}{pm}")
    return " · ".join(parts)


# ---- intervals (sae_mlops.core.intervals): names and formatting -------------------------------------
#: suffixes of a metric's 95 % bootstrap interval bounds: ``recon/cosine_ci_low``, ``recon/cosine_ci_high``
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


def ci_names(name: str) -> tuple[str, str]:
    """The metric names of ``name``'s interval bounds (logged to MLflow and the results JSON)."""
    return name + CI_LOW, name + CI_HIGH


def is_interval_name(name: str) -> bool:
    """True for an interval bound's name (``..._ci_low`` / ``..._ci_high``)."""
    return name.endswith(CI_LOW) or name.endswith(CI_HIGH)


def interval_of(metrics: dict[str, Any], name: str) -> tuple[float, float] | None:
    """``(low, high)`` of ``name``'s interval in ``metrics``; None when absent or not finite."""
    lo, hi = (metrics.get(n) for n in ci_names(name))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) for v in (lo, hi)):
        return None
    return float(lo), float(hi)  # type: ignore[arg-type]


def format_with_interval(metric: Metric, metrics: dict[str, Any]) -> str:
    """``value ± half-width`` (the half-width of the 95 % interval, in the metric's format) when the
    interval is known, else the value alone; 'n/a' when the value is absent."""
    value = metrics.get(metric.name)
    text = metric.format(value)
    ci = interval_of(metrics, metric.name)
    if ci is None or text == "n/a":
        return text
    half = (ci[1] - ci[0]) / 2.0
    return f"{text} ± {metric.format(half)}"


# --- evals (sae_mlops.evals; docs/guides/evals.md) -------------------------------------------------
# Kept apart from METRICS (the analysis's table, which the README's metric table lists) and found by
# `lookup` like any other. Per-dataset and per-letter metrics (``probe/<dataset>/<name>``,
# ``absorption/<letter>/<name>``) are described by the row of ``<group>/<name>``. Intervals are logged
# as ``<name>_ci_low`` / ``<name>_ci_high`` (95 %), found through `ci_names`.
PROBE_KS = (1, 2, 5, 10, 20, 50)
EVAL_METRICS: tuple[Metric, ...] = (
    *(Metric(f"probe/sae_acc_k{k}", f"k-sparse probe accuracy, SAE top-{k} latents", "accuracy", "{:.3f}", True,
             "probe_acc_k1" if k == 1 else None) for k in PROBE_KS),
    *(Metric(f"probe/sae_auc_k{k}", f"k-sparse probe AUC, SAE top-{k} latents", "AUC", "{:.3f}", True) for k in PROBE_KS),
    *(Metric(f"probe/raw_acc_k{k}", f"probe accuracy, top-{k} raw dimensions (baseline)", "accuracy", "{:.3f}", True)
      for k in PROBE_KS),
    *(Metric(f"probe/raw_auc_k{k}", f"probe AUC, top-{k} raw dimensions (baseline)", "AUC", "{:.3f}", True) for k in PROBE_KS),
    Metric("probe/dense_acc", "probe accuracy, all raw dimensions (dense baseline)", "accuracy", "{:.3f}", True),
    Metric("probe/dense_auc", "probe AUC, all raw dimensions (dense baseline)", "AUC", "{:.3f}", True),
    Metric("probe/datasets", "probing datasets", "datasets", "{:,.0f}"),
    Metric("probe/tasks", "probing tasks (binary, one-vs-rest)", "tasks", "{:,.0f}"),
    Metric("absorption/probe_accuracy", "first-letter probe accuracy (on hook activations)", "accuracy", "{:.3f}"),
    Metric("absorption/letters_evaluated", "letters whose probe clears the F1 floor", "letters", "{:,.0f}"),
    Metric("absorption/letters_with_words", "letters with enough single-token words", "letters", "{:,.0f}"),
    Metric("absorption/words", "single-token words", "words", "{:,.0f}"),
    Metric("absorption/full_absorption_rate", "full absorption rate (mean over letters)", "fraction", "{:.3f}", False,
           "absorption_rate"),
    Metric("absorption/absorption_fraction", "absorption fraction (mean over letters)", "fraction", "{:.3f}", False),
    Metric("absorption/split_latents", "split latents per letter", "latents", "{:.2f}", False),
    Metric("autointerp/detection_score", "auto-interp detection score (balanced accuracy)", "balanced accuracy", "{:.3f}",
           True, "autointerp"),
    Metric("autointerp/features_scored", "features with a detection score", "features", "{:,.0f}"),
    Metric("autointerp/features_not_scored", "features not scored (too few snippets)", "features", "{:,.0f}"),
    Metric("autointerp/features_labelled", "features labelled", "features", "{:,.0f}"),
    Metric("time/eval_probe", "k-sparse probing", "s", "{:,.1f}", False, summary=False),
    Metric("time/eval_absorption", "absorption eval", "s", "{:,.1f}", False, summary=False),
    Metric("time/eval_autointerp", "auto-interp (labels and detection)", "s", "{:,.1f}", False, summary=False),
)
EVAL_BY_NAME: dict[str, Metric] = {m.name: m for m in EVAL_METRICS}
EVAL_BY_SHORT: dict[str, Metric] = {m.short: m for m in EVAL_METRICS if m.short}
_PER_ITEM_GROUPS = ("probe", "absorption")


def eval_metric(name: str) -> Metric | None:
    """The eval metric for a name: exact (``probe/sae_acc_k5``), short (``autointerp``), per dataset or
    letter (``probe/<dataset>/sae_acc_k5`` -> ``probe/sae_acc_k5``); None if unknown."""
    if name in EVAL_BY_NAME:
        return EVAL_BY_NAME[name]
    if name in EVAL_BY_SHORT:
        return EVAL_BY_SHORT[name]
    parts = name.split("/")
    if len(parts) == 3 and parts[0] in _PER_ITEM_GROUPS:
        return EVAL_BY_NAME.get(f"{parts[0]}/{parts[2]}")
    return None

