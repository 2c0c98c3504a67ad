"""Verdicts: is a variant better than the reference, worse, or within noise?

For every variant and every judged metric (registry metrics with a direction), the difference
``variant - reference`` gets a 95 % bootstrap interval and a p-value from
:func:`sae_mlops.core.intervals.paired_differences` (paired block by block when the two analyses
share the token plan, else unpaired). Then:

1. **Multiplicity.** The p-values of all (variant, metric) tests of one comparison are adjusted by
   Holm's step-down method (``statsmodels.stats.multitest.multipletests(method="holm")``), which
   controls the family-wise error rate at ``alpha`` (default 0.05) under any dependence between the
   tests. A difference is *significant* when its Holm-adjusted p-value is below ``alpha``.
2. **Seed noise floor.** When analyses of several training seeds of one recipe exist, the
   between-seed standard deviation ``s`` of each metric (pooled over recipes with >= 2 seeds,
   ``df = sum(n_r - 1)``) gives the smallest difference two single-seed SAEs can be trusted to have:
   ``floor = t_{0.975, df} * s * sqrt(2)`` (the half-width of a 95 % t interval of a difference of two
   independent seeds). A significant difference is a verdict only if ``|diff| > floor``.
3. **Verdict.** ``better`` / ``worse`` by the registry's direction (``higher_is_better``) when
   significant and above the floor; otherwise ``within noise``. ``bound`` says which bound decided:
   ``sampling`` (the interval contains 0 or the adjusted p is too large) or ``seed`` (significant on
   tokens, but inside the seed floor); for a clear verdict it names the larger of the two bounds.

The intervals cover the token sample; the seed floor covers the training seed. Neither covers a
change of corpus or model: compare analyses of one plan where you can.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sae_mlops.core.intervals import BlockSums, paired_differences
from sae_mlops.metrics import BY_SHORT, lookup

#: the metrics judged by default (short names; a direction each), in table order
VERDICT_METRICS = ("l0", "dead_fraction", "explained_variance", "mse_per_token", "cosine", "ce_sae", "loss_recovered",
                   "kl_sae", "kl_score")
DEFAULT_ALPHA = 0.05


@dataclass
class Verdict:
    """One row of the verdict table (``a``: the variant, ``b``: the reference)."""

    variant: str
    reference: str
    metric: str  # registry name
    label: str
    variant_value: float
    reference_value: float
    diff: float
    low: float
    high: float
    p_value: float
    p_holm: float
    paired: bool
    seed_floor: float | None
    verdict: str  # better | worse | within noise | n/a
    bound: str  # sampling | seed | ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judged_metrics(names: Sequence[str] | None = None) -> list[str]:
    """Registry names of the judged metrics (``names``: short or full names; default
    :data:`VERDICT_METRICS`); a metric without a direction cannot be judged (``ValueError``)."""
    out = []
    for n in names or VERDICT_METRICS:
        m = lookup(n)
        if m is None:
            raise ValueError(f"unknown metric {n!r}")
        if m.higher_is_better is None:
            raise ValueError(f"metric {m.name} has no better direction; it cannot be judged")
        out.append(m.name)
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels); NaN entries stay NaN and are not counted in the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return [float(v) for v in out]


def seed_floors(groups: Mapping[str, Sequence[Mapping[str, float]]], metrics: Sequence[str],
                level: float = 0.95) -> dict[str, float]:
    """The seed noise floor of each metric (module docstring, item 2) from ``groups``: recipe ->
    the metric dicts of its seeds' analyses. Recipes with fewer than 2 seeds do not count; a metric
    with no df gets no floor."""
    from scipy.stats import t

    floors: dict[str, float] = {}
    for name in metrics:
        ss, df = 0.0, 0
        for runs in groups.values():
            vals = np.array([float(r[name]) for r in runs if name in r and r[name] is not None
                             and math.isfinite(float(r[name]))])
            if vals.size >= 2:
                ss += float(((vals - vals.mean()) ** 2).sum())
                df += vals.size - 1
        if df > 0:
            s = math.sqrt(ss / df)
            floors[name] = float(t.ppf(0.5 + level / 2, df) * s * math.sqrt(2.0))
    return floors


#: eval metrics judged from their logged intervals when both analyses have them (sae_mlops.evals)
EVAL_VERDICT_METRICS = ("probe/sae_acc_k1", "probe/sae_acc_k5", "absorption/full_absorption_rate",
                        "autointerp/detection_score")


def interval_rows(reference: tuple[str, Mapping[str, Any]], variants: Sequence[tuple[str, Mapping[str, Any]]],
                  metrics: Sequence[str] = EVAL_VERDICT_METRICS) -> list[Verdict]:
    """Unpaired rows for metrics that have a logged 95 % interval but no per-block sums (the evals:
    probing, absorption, auto-interp): each interval is read as ``value ± 1.96 se`` (a normal
    approximation), the difference's standard error is ``sqrt(se_a^2 + se_b^2)`` and its p-value
    ``2 (1 - Phi(|diff| / se))``. Only metrics both analyses have, with intervals, get a row."""
    from statistics import NormalDist

    from sae_mlops.metrics import interval_of

    ref_label, ref = reference
    rows: list[Verdict] = []
    for label, m in variants:
        for name in metrics:
            meta = lookup(name)
            ca, cb = interval_of(dict(m), name), interval_of(dict(ref), name)
            a, b = m.get(name), ref.get(name)
            if meta is None or ca is None or cb is None or a is None or b is None:
                continue
            se = math.hypot((ca[1] - ca[0]) / 3.92, (cb[1] - cb[0]) / 3.92)
            diff = float(a) - float(b)
            p = 1.0 if se == 0 and diff == 0 else (0.0 if se == 0 else 2 * (1 - NormalDist().cdf(abs(diff) / se)))
            rows.append(Verdict(label, ref_label, name, meta.label.split(" (")[0], float(a), float(b), diff,
                                diff - 1.96 * se, diff + 1.96 * se, p, float("nan"), False, None, "n/a", ""))
    return rows


def judge(reference: tuple[str, BlockSums], variants: Sequence[tuple[str, BlockSums]],
          metrics: Sequence[str] | None = None, alpha: float = DEFAULT_ALPHA, resamples: int = 9999, seed: int = 0,
          floors: Mapping[str, float] | None = None, extra: Sequence[Verdict] = ()) -> list[Verdict]:
    """The verdict of every variant against ``reference`` on every judged metric (module docstring);
    ``extra`` rows (e.g. :func:`interval_rows` for the evals) join the same Holm family."""
    return judge_pairs([(reference, v) for v in variants], metrics, alpha, resamples, seed, floors, extra)


def judge_pairs(pairs: Sequence[tuple[tuple[str, BlockSums], tuple[str, BlockSums]]],
                metrics: Sequence[str] | None = None, alpha: float = DEFAULT_ALPHA, resamples: int = 9999,
                seed: int = 0, floors: Mapping[str, float] | None = None, extra: Sequence[Verdict] = ()) -> list[Verdict]:
    """Verdicts of each ``(reference, variant)`` pair (e.g. each trained SAE against each of its random
    baselines), every row of every pair in one Holm family."""
    names = judged_metrics(metrics)
    rows: list[Verdict] = []
    for (ref_label, ref), (label, sums) in pairs:
        diffs = {d.metric: d for d in paired_differences(sums, ref, resamples=resamples, seed=seed)}
        for name in names:
            d = diffs.get(name)
            m = lookup(name)
            assert m is not None
            if d is None:
                continue
            rows.append(Verdict(label, ref_label, name, m.label.split(" (")[0], d.a, d.b, d.diff, d.low, d.high,
                                d.p_value, float("nan"), d.paired, (floors or {}).get(name), "n/a", ""))
    rows += list(extra)
    for row, p_adj in zip(rows, holm([r.p_value for r in rows]), strict=True):
        row.p_holm = p_adj
        row.verdict, row.bound = _decide(row, alpha)
    return rows


def _decide(row: Verdict, alpha: float) -> tuple[str, str]:
    m = lookup(row.metric)
    if m is None or not math.isfinite(row.p_holm) or not math.isfinite(row.diff):
        return "n/a", ""
    significant = row.p_holm < alpha
    floor = row.seed_floor
    half = (row.high - row.low) / 2.0 if math.isfinite(row.high - row.low) else float("nan")
    if not significant:
        return "within noise", "sampling"
    if floor is not None and abs(row.diff) <= floor:
        return "within noise", "seed"
    up = row.diff > 0
    better = up if m.higher_is_better else not up
    bound = "seed" if floor is not None and floor > half else "sampling"
    return ("better" if better else "worse"), bound


def summary_counts(rows: Sequence[Verdict]) -> dict[str, int]:
    """How many rows have each verdict."""
    out: dict[str, int] = {}
    for r in rows:
        out[r.verdict] = out.get(r.verdict, 0) + 1
    return out


__all__ = ["BY_SHORT", "VERDICT_METRICS", "Verdict", "holm", "judge", "judged_metrics", "seed_floors"]
