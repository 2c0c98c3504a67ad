"""Reconstruction metrics (over the analysed tokens T; x the hook activation, x_hat the SAE output).

- ``mse_per_token = mean_t ||x - x_hat||^2`` (SAELens ``mse``); ``mse_per_element = mse_per_token / d_in``
  (what the prior tool called ``mse``). Units: squared activation units.
- ``explained_variance = 1 - mean_t ||x - x_hat||^2 / (mean_t ||x||^2 - ||mean_t x||^2)``: total
  variance summed over dimensions about the per-dimension mean (SAELens >= 6.45), sums in float64.
- ``explained_variance_pooled = 1 - mse_per_element / var(all elements of x pooled)``: the prior
  tool's figure, dominated by a few large residual dimensions; reported under its own name only.
- ``cosine = mean_t cos(x, x_hat)`` (a zero-norm vector counts as cosine 0).
- ``l2_ratio = mean_t ||x_hat|| / ||x||`` (SAELens: ``||x|| < 1e-4`` divides by 1).
- ``relative_reconstruction_bias = mean_t ||x_hat||^2 / mean_t <x, x_hat>`` (Eq. 10 of
  arXiv:2404.16014). SAELens averages this ratio per batch; we take it over all tokens, which is
  the same on one batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sae_mlops.core.collectors.base import StepData, f64sum
from sae_mlops.core.collectors.state import StateCollector


class ReconstructionCollector(StateCollector):
    name = "reconstruction"
    n: int
    sum_sq_err: float
    sum_sq_norm: float
    sum_x: torch.Tensor  # [d_in] float64
    sum_cos: float
    sum_l2_ratio: float
    sum_xhat_sq: float
    sum_dot: float

    def __init__(self, d_in: int):
        super().__init__()
        self.d_in = d_in
        self.add_state("n", 0, "sum")
        self.add_state("sum_sq_err", 0.0, "sum")
        self.add_state("sum_sq_norm", 0.0, "sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), "sum")
        for name in ("sum_cos", "sum_l2_ratio", "sum_xhat_sq", "sum_dot"):
            self.add_state(name, 0.0, "sum")

    def state_config(self) -> dict[str, Any]:
        return {"d_in": self.d_in}

    def update(self, step: StepData) -> None:
        x = step.x.float()
        x_hat = step.x_hat.float()
        x_norm = x.norm(dim=-1)
        xh_norm = x_hat.norm(dim=-1)
        dot = (x * x_hat).sum(dim=-1)
        self.n += x.shape[0]
        self.sum_sq_err += f64sum((x - x_hat).pow(2).sum(dim=-1))
        self.sum_sq_norm += f64sum(x.pow(2).sum(dim=-1))
        self.sum_x += x.sum(dim=0, dtype=torch.float64).cpu()
        denom = x_norm * xh_norm
        self.sum_cos += f64sum(torch.where(denom > 0, dot / denom.clamp(min=1e-30), torch.zeros_like(dot)))
        safe_norm = torch.where(x_norm.abs() < 1e-4, torch.ones_like(x_norm), x_norm)
        self.sum_l2_ratio += f64sum(xh_norm / safe_norm)
        self.sum_xhat_sq += f64sum(xh_norm.pow(2))
        self.sum_dot += f64sum(dot)

    def compute(self) -> dict[str, Any]:
        n, d = self.n, self.d_in
        if n == 0:
            return {}
        mse = self.sum_sq_err / n
        mean_sq_norm = self.sum_sq_norm / n
        total_var = mean_sq_norm - float((self.sum_x / n).pow(2).sum())
        ev = _ev(mse, total_var)
        pooled_mean = float(self.sum_x.sum()) / (n * d)
        pooled_var = mean_sq_norm / d - pooled_mean**2
        return {
            "recon/mse_per_token": mse,
            "recon/mse_per_element": mse / d,
            "recon/explained_variance": ev,
            "recon/explained_variance_pooled": _ev(mse / d, pooled_var),
            "recon/cosine": self.sum_cos / n,
            "recon/l2_ratio": self.sum_l2_ratio / n,
            "recon/relative_reconstruction_bias": (
                self.sum_xhat_sq / self.sum_dot if self.sum_dot != 0 else math.nan
            ),
        }


def _ev(mse: float, variance: float) -> float:
    """1 - mse / variance, with SAELens's convention for a (near) constant input."""
    if variance < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1.0 - mse / variance
