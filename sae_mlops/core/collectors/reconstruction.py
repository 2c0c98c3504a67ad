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
from collections.abc import Mapping
from typing import Any

import numpy as np
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
        t = token_reconstruction(step)
        x = step.x.float()
        self.n += x.shape[0]
        self.sum_sq_err += f64sum(t["sum_sq_err"])
        self.sum_sq_norm += f64sum(t["sum_sq_norm"])
        self.sum_x += x.sum(dim=0, dtype=torch.float64).cpu()
        self.sum_cos += f64sum(t["sum_cos"])
        self.sum_l2_ratio += f64sum(t["sum_l2_ratio"])
        self.sum_xhat_sq += f64sum(t["sum_xhat_sq"])
        self.sum_dot += f64sum(t["sum_dot"])

    def compute(self) -> dict[str, Any]:
        if self.n == 0:
            return {}
        sums: dict[str, Any] = {k: getattr(self, k) for k in SUM_NAMES}
        sums["sum_x"] = self.sum_x.numpy()
        return {k: float(v) for k, v in reconstruction_metrics(sums, self.d_in).items()}


SUM_NAMES = ("n", "sum_sq_err", "sum_sq_norm", "sum_cos", "sum_l2_ratio", "sum_xhat_sq", "sum_dot")
#: the per-token terms of :func:`per_token_reconstruction`, summed into the state of the same name
TERM_NAMES = SUM_NAMES[1:]


def per_token_reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-token terms the metrics sum ([n] each, on x's device): ``sum_sq_err = ||x - x_hat||^2``,
    ``sum_sq_norm = ||x||^2``, ``sum_cos = cos(x, x_hat)`` (0 for a zero-norm vector), ``sum_l2_ratio
    = ||x_hat|| / ||x||`` (``||x|| < 1e-4`` divides by 1), ``sum_xhat_sq = ||x_hat||^2``, ``sum_dot =
    <x, x_hat>``."""
    x = x.float()
    x_hat = x_hat.float()
    x_norm = x.norm(dim=-1)
    xh_norm = x_hat.norm(dim=-1)
    dot = (x * x_hat).sum(dim=-1)
    denom = x_norm * xh_norm
    safe_norm = torch.where(x_norm.abs() < 1e-4, torch.ones_like(x_norm), x_norm)
    return {
        "sum_sq_err": (x - x_hat).pow(2).sum(dim=-1),
        "sum_sq_norm": x.pow(2).sum(dim=-1),
        "sum_cos": torch.where(denom > 0, dot / denom.clamp(min=1e-30), torch.zeros_like(dot)),
        "sum_l2_ratio": xh_norm / safe_norm,
        "sum_xhat_sq": xh_norm.pow(2),
        "sum_dot": dot,
    }


def token_reconstruction(step: StepData) -> dict[str, torch.Tensor]:
    """:func:`per_token_reconstruction` of a batch, computed once and shared by the collectors that sum it."""
    return step.shared("token_reconstruction", lambda: per_token_reconstruction(step.x, step.x_hat))


def reconstruction_metrics(s: Mapping[str, Any], d_in: int) -> dict[str, Any]:
    """The reconstruction metrics from sums (the module docstring's formulas): ``s`` holds the
    :data:`SUM_NAMES` (scalars or [R] arrays) and ``sum_x`` ([d_in] or [R, d_in]). Vectorised over
    the leading R axis for the bootstrap (:mod:`sae_mlops.core.intervals`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.asarray(s["n"], dtype=np.float64)
        mse = np.asarray(s["sum_sq_err"], dtype=np.float64) / n
        mean_sq_norm = np.asarray(s["sum_sq_norm"], dtype=np.float64) / n
        sum_x = np.asarray(s["sum_x"], dtype=np.float64)
        total_var = mean_sq_norm - ((sum_x / n[..., None]) ** 2).sum(axis=-1)
        pooled_mean = sum_x.sum(axis=-1) / (n * d_in)
        pooled_var = mean_sq_norm / d_in - pooled_mean**2
        sum_dot = np.asarray(s["sum_dot"], dtype=np.float64)
        return {
            "recon/mse_per_token": mse,
            "recon/mse_per_element": mse / d_in,
            "recon/explained_variance": _ev(mse, total_var),
            "recon/explained_variance_pooled": _ev(mse / d_in, pooled_var),
            "recon/cosine": np.asarray(s["sum_cos"], dtype=np.float64) / n,
            "recon/l2_ratio": np.asarray(s["sum_l2_ratio"], dtype=np.float64) / n,
            "recon/relative_reconstruction_bias": np.where(
                sum_dot != 0, np.asarray(s["sum_xhat_sq"], dtype=np.float64) / np.where(sum_dot != 0, sum_dot, 1.0),
                math.nan),
        }


def _ev(mse: Any, variance: Any) -> Any:
    """1 - mse / variance, with SAELens's convention for a (near) constant input (elementwise)."""
    mse, variance = np.asarray(mse, dtype=np.float64), np.asarray(variance, dtype=np.float64)
    const = np.where(mse < 1e-10, 1.0, 0.0)
    return np.where(variance < 1e-10, const, 1.0 - mse / np.where(variance < 1e-10, 1.0, variance))
