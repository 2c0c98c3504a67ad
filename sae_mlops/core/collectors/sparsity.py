"""Sparsity and feature-liveness metrics (over the analysed tokens T).

- ``L0(t) = #{i : f_i(t) != 0}``, ``L1(t) = sum_i |f_i(t)|``; reported as mean and population std
  over tokens (``std = sqrt(E[v^2] - E[v]^2)``).
- ``freq_i = #{t : f_i(t) != 0} / |T|``: dead when ``freq_i == 0``, rare when
  ``0 < freq_i < rare_threshold``, dense when ``freq_i > dense_threshold``.
- Per feature, also the sum and max of its activation where it fired (for the mean activation
  ``act_sum_i / count_i`` in the feature summaries).

Matches SAELens ``run_evals`` ``sparsity/l0`` and ``sparsity/l1`` (``!= 0`` and ``abs`` so that
signed architectures count correctly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sae_mlops.core.collectors.base import SparseCodes, StepData, f64sum
from sae_mlops.core.collectors.state import StateCollector


SUM_NAMES = ("n_tokens", "sum_l0", "sum_l0_sq", "sum_l1", "sum_l1_sq")  #: the scalar sums the metrics need


def per_token_sparsity(sp: SparseCodes, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L0, L1)`` per analysed row, [n] each (int64 and float64), from a batch's non-zero codes."""
    l0 = torch.bincount(sp.rows, minlength=n)
    l1 = torch.bincount(sp.rows, weights=sp.values.abs().double(), minlength=n)
    return l0, l1


def token_sparsity(step: StepData) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_token_sparsity` of a batch, computed once and shared by the collectors that sum it."""
    return step.shared("token_sparsity", lambda: per_token_sparsity(step.sparse, int(step.f.shape[0])))


def sparsity_metrics(s: Mapping[str, Any], d_sae: int, rare_threshold: float, dense_threshold: float) -> dict[str, Any]:
    """The sparsity and feature-class metrics from sums (the module docstring's formulas).

    ``s``: ``n_tokens``, ``sum_l0``, ``sum_l0_sq``, ``sum_l1``, ``sum_l1_sq`` (scalars or arrays of
    shape [R]) and ``fire_count`` ([d_sae] or [R, d_sae]). Vectorised over the leading R axis, so
    the bootstrap (:mod:`sae_mlops.core.intervals`) recomputes the very same formulas from
    resampled sums. NaN where ``n_tokens`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.asarray(s["n_tokens"], dtype=np.float64)
        l0_mean = np.asarray(s["sum_l0"], dtype=np.float64) / n
        l1_mean = np.asarray(s["sum_l1"], dtype=np.float64) / n
        l0_var = np.asarray(s["sum_l0_sq"], dtype=np.float64) / n - l0_mean**2
        l1_var = np.asarray(s["sum_l1_sq"], dtype=np.float64) / n - l1_mean**2
        fire = np.asarray(s["fire_count"])
        freq = fire / n[..., None]
        dead = (fire == 0).sum(axis=-1)
        rare = ((freq > 0) & (freq < rare_threshold)).sum(axis=-1)
        dense = (freq > dense_threshold).sum(axis=-1)
        return {
            "sparsity/l0_mean": l0_mean,
            "sparsity/l0_std": np.sqrt(np.maximum(l0_var, 0.0)),
            "sparsity/l1_mean": l1_mean,
            "sparsity/l1_std": np.sqrt(np.maximum(l1_var, 0.0)),
            "features/dead_count": dead,
            "features/dead_fraction": dead / d_sae,
            "features/rare_count": rare,
            "features/rare_fraction": rare / d_sae,
            "features/dense_count": dense,
            "features/dense_fraction": dense / d_sae,
            "features/alive_count": d_sae - dead,
        }


class SparsityCollector(StateCollector):
    name = "sparsity"
    n_tokens: int
    sum_l0: float
    sum_l0_sq: float
    sum_l1: float
    sum_l1_sq: float
    fire_count: torch.Tensor  # [d_sae] int64
    act_sum: torch.Tensor  # [d_sae] float64, sum of f_i over its firings
    act_max: torch.Tensor  # [d_sae] float64, max |f_i|
    l0_hist: torch.Tensor  # [d_sae + 1] int64, tokens per L0 value

    def __init__(self, d_sae: int, rare_threshold: float = 1e-5, dense_threshold: float = 0.1):
        super().__init__()
        self.d_sae = d_sae
        self.rare_threshold = rare_threshold
        self.dense_threshold = dense_threshold
        self.add_state("n_tokens", 0, "sum")
        for name in ("sum_l0", "sum_l0_sq", "sum_l1", "sum_l1_sq"):
            self.add_state(name, 0.0, "sum")
        self.add_state("fire_count", torch.zeros(d_sae, dtype=torch.int64), "sum")
        self.add_state("act_sum", torch.zeros(d_sae, dtype=torch.float64), "sum")
        self.add_state("act_max", torch.zeros(d_sae, dtype=torch.float64), "max")
        self.add_state("l0_hist", torch.zeros(d_sae + 1, dtype=torch.int64), "sum")

    def state_config(self) -> dict[str, Any]:
        return {"d_sae": self.d_sae, "rare_threshold": self.rare_threshold, "dense_threshold": self.dense_threshold}

    def update(self, step: StepData) -> None:
        """O(nnz) from the batch's non-zero codes (``step.sparse``)."""
        n = int(step.f.shape[0])
        sp = step.sparse
        mag = sp.values.abs().double()
        l0, l1 = token_sparsity(step)
        l0f = l0.double()
        self.n_tokens += n
        self.sum_l0 += float(l0f.sum())
        self.sum_l0_sq += float((l0f * l0f).sum())
        self.sum_l1 += float(l1.sum())
        self.sum_l1_sq += float((l1 * l1).sum())
        self.fire_count += torch.bincount(sp.cols, minlength=self.d_sae)
        self.l0_hist += torch.bincount(l0, minlength=self.d_sae + 1)
        self.act_sum += torch.bincount(sp.cols, weights=sp.values.double(), minlength=self.d_sae)
        self.act_max.scatter_reduce_(0, sp.cols, mag, reduce="amax")

    def frequency(self) -> torch.Tensor:
        return self.fire_count.double() / max(self.n_tokens, 1)

    def compute(self) -> dict[str, Any]:
        sums = {k: getattr(self, k) for k in SUM_NAMES}
        sums["fire_count"] = self.fire_count.numpy()
        out = sparsity_metrics(sums, self.d_sae, self.rare_threshold, self.dense_threshold)
        if self.n_tokens == 0:
            return {k: v for k, v in out.items() if k.startswith("sparsity/")}
        return {k: (int(v) if k.endswith("_count") else float(v)) for k, v in out.items()}

    def per_feature(self) -> dict[str, list[float]]:
        count = self.fire_count.double()
        mean = torch.where(count > 0, self.act_sum / count.clamp(min=1), torch.zeros_like(count))
        return {
            "firing_count": self.fire_count.tolist(),
            "frequency": self.frequency().tolist(),
            "mean_activation": mean.tolist(),
            "max_activation": self.act_max.tolist(),
        }


__all__ = ["SparsityCollector", "f64sum"]
