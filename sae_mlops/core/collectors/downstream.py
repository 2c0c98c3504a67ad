"""Downstream metrics: what splicing the SAE in does to the model's next-token predictions.

Predictions are from position t to t+1 with t in T (analysed) and t+1 a real token of the same
window. Three forward variants share the clean prefix up to the hook:

- ``ce_clean``: mean next-token cross-entropy (nats) with the hook untouched;
- ``ce_sae``: the hook output replaced by x_hat at positions in T (special positions keep x);
- ``ce_zero``: the hook output zeroed at every position (SAELens convention).
- ``loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)`` (SAELens ``ce_loss_score``; equal to
  the prior tool's ``1 - (ce_sae - ce_clean) / (ce_zero - ce_clean)``); NaN with a warning when
  ``ce_zero <= ce_clean``.
- ``kl_sae = mean_t KL(p_clean(t) || p_sae(t))`` summed over the vocabulary (nats), over every
  t in T (the last position of a window included, as SAELens does); ``kl_zero`` likewise;
  ``kl_score = 1 - kl_sae / kl_zero``.

All averages are per prediction (per token), never a mean of batch means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sae_mlops.core.collectors.base import StepData, f64sum
from sae_mlops.core.collectors.state import StateCollector


class DownstreamCollector(StateCollector):
    name = "downstream"
    n_pred: int  # predictions (CE terms)
    n_kl: int  # KL terms (analysed positions)
    sum_ce_clean: float  # nats, summed over predictions
    sum_ce_sae: float
    sum_ce_zero: float
    sum_kl_sae: float  # nats, summed over analysed positions
    sum_kl_zero: float

    def __init__(self) -> None:
        super().__init__()
        self.add_state("n_pred", 0, "sum")
        self.add_state("n_kl", 0, "sum")
        for name in ("sum_ce_clean", "sum_ce_sae", "sum_ce_zero", "sum_kl_sae", "sum_kl_zero"):
            self.add_state(name, 0.0, "sum")
        self.warnings: list[str] = []

    def update(self, step: StepData) -> None:
        if step.ce_clean is None:
            return
        assert step.ce_sae is not None and step.ce_zero is not None and step.kl_sae is not None and step.kl_zero is not None
        self.n_pred += int(step.ce_clean.numel())
        self.sum_ce_clean += f64sum(step.ce_clean)
        self.sum_ce_sae += f64sum(step.ce_sae)
        self.sum_ce_zero += f64sum(step.ce_zero)
        self.n_kl += int(step.kl_sae.numel())
        self.sum_kl_sae += f64sum(step.kl_sae)
        self.sum_kl_zero += f64sum(step.kl_zero)

    def compute(self) -> dict[str, Any]:
        if self.n_pred == 0:
            return {}
        out = {k: float(v) for k, v in downstream_metrics({k: getattr(self, k) for k in SUM_NAMES}).items()}
        if out["downstream/ce_zero"] - out["downstream/ce_clean"] <= 0:
            self.warnings.append(
                f"zero-ablation does not raise the loss (CE zero {out['downstream/ce_zero']:.4f} <= CE clean "
                f"{out['downstream/ce_clean']:.4f}): loss recovered is undefined (NaN) at this hook."
            )
        return out


SUM_NAMES = ("n_pred", "n_kl", "sum_ce_clean", "sum_ce_sae", "sum_ce_zero", "sum_kl_sae", "sum_kl_zero")


def downstream_metrics(s: Mapping[str, Any]) -> dict[str, Any]:
    """The downstream metrics from the :data:`SUM_NAMES` sums (scalars or [R] arrays; the module
    docstring's formulas). Vectorised over R for the bootstrap; ``loss_recovered`` is NaN where
    ``ce_zero <= ce_clean``, ``kl_score`` NaN where ``kl_zero`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n_pred = np.asarray(s["n_pred"], dtype=np.float64)
        n_kl = np.maximum(np.asarray(s["n_kl"], dtype=np.float64), 1.0)
        ce = {k: np.asarray(s[f"sum_ce_{k}"], dtype=np.float64) / n_pred for k in ("clean", "sae", "zero")}
        kl_sae = np.asarray(s["sum_kl_sae"], dtype=np.float64) / n_kl
        kl_zero = np.asarray(s["sum_kl_zero"], dtype=np.float64) / n_kl
        gap = ce["zero"] - ce["clean"]
        return {
            "downstream/ce_clean": ce["clean"],
            "downstream/ce_sae": ce["sae"],
            "downstream/ce_zero": ce["zero"],
            "downstream/loss_recovered": np.where(gap > 0, (ce["zero"] - ce["sae"]) / np.where(gap > 0, gap, 1.0), math.nan),
            "downstream/kl_sae": kl_sae,
            "downstream/kl_zero": kl_zero,
            "downstream/kl_score": np.where(kl_zero > 0, 1.0 - kl_sae / np.where(kl_zero > 0, kl_zero, 1.0), math.nan),
        }
