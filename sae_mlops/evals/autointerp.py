"""Auto-interpretability as a per-SAE eval: the detection score of `sae-mlops label`
(`sae_mlops.features.label`: an LLM labels a feature from its top examples, then picks the activating
snippets out of held-out activating and non-activating ones; Bills et al. 2023, as delphi and SAEBench
score labels) summarised over the scored features.

- ``autointerp/detection_score``: the mean over scored features of the detection balanced accuracy
  (0.5 is chance, 1 is perfect);
- ``autointerp/detection_score_ci_low`` / ``_ci_high``: its 95 % percentile-bootstrap interval over
  features (``scipy.stats.bootstrap``, 2000 resamples, seed 0; at least 3 scored features). It covers
  the choice of features, not the LLM's sampling or the snippet draw;
- ``autointerp/features_scored``, ``autointerp/features_not_scored`` (too few activating or
  non-activating snippets, e.g. a dense feature that fires in every window), ``autointerp/features_labelled``.

Known weaknesses: the score depends on the judge model and prompt (recorded as tags); on a small
number of features the interval is wide; Sanity Checks for SAEs (arXiv 2602.14111) found random-direction
baselines within a few points of trained SAEs on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def autointerp_metrics(records: dict[int, dict[str, Any]]) -> dict[str, float]:
    """The ``autointerp/...`` metrics from ``labels.jsonl`` records (module docstring)."""
    scores = np.array([float(r["detection_balanced_accuracy"]) for r in records.values()
                       if r.get("detection_balanced_accuracy") is not None and np.isfinite(float(r["detection_balanced_accuracy"]))])
    out = {
        "autointerp/features_labelled": float(len(records)),
        "autointerp/features_scored": float(scores.size),
        "autointerp/features_not_scored": float(sum(1 for r in records.values() if r.get("detection_skipped"))),
    }
    if scores.size:
        out["autointerp/detection_score"] = float(scores.mean())
    if scores.size >= 3:
        if np.ptp(scores) == 0:
            lo = hi = float(scores[0])
        else:
            from scipy.stats import bootstrap

            ci = bootstrap((scores,), np.mean, n_resamples=2000, confidence_level=0.95, method="percentile",
                           random_state=np.random.default_rng(0)).confidence_interval
            lo, hi = float(ci.low), float(ci.high)
        out["autointerp/detection_score_ci_low"], out["autointerp/detection_score_ci_high"] = lo, hi
    return out
