"""Random baselines for SAE training (Korznikov et al., "Sanity Checks for Sparse Autoencoders: Do SAEs
Beat Random Baselines?", arXiv 2602.14111): part of the SAE is fixed at its random initialisation and
the rest is trained as usual, so that a trained SAE can be compared with what random directions or
random activation patterns achieve on the same hook, data and budget.

Baselines (names as given to ``--baseline``):

- ``frozen-decoder``: the decoder ``W_dec`` (the feature directions) stays at its random
  initialisation; encoder, biases (and JumpReLU thresholds) are trained.
- ``soft-frozen-decoder``: the decoder starts random and after every optimizer step each row ``w_i``
  is projected back so that ``cos(w_i, w_i^0) >= 0.8`` (its norm kept): the row is rotated towards
  its initial direction ``u_i = w_i^0 / ||w_i^0||`` until ``cos = 0.8``, i.e.
  ``w_i <- ||w_i|| (0.8 u_i + 0.6 p_i / ||p_i||)`` with ``p_i`` the part of ``w_i`` orthogonal to
  ``u_i`` (any ``p_i`` when it is zero). The paper's third baseline.
- ``frozen-encoder``: the encoder ``W_enc`` and ``b_enc`` (which features fire on which inputs: the
  activation patterns) stay at their random initialisation; decoder and ``b_dec`` are trained.

Freezing sets ``requires_grad=False`` before SAELens's trainer builds its Adam optimizer (a
parameter without a gradient is never updated by Adam). :func:`frozen_change` measures the largest
absolute change of the frozen tensors (0 for the hard-frozen baselines; a test checks it).
Hand-written because SAELens has no frozen-part training option; it is a few tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sae_mlops.training.config import BASELINES

__all__ = ["BASELINES", "BaselineState", "after_step", "apply_baseline", "frozen_change"]
SOFT_FROZEN_MIN_COSINE = 0.8


@dataclass
class BaselineState:
    """The baseline applied to one SAE and the initial values of its frozen tensors."""

    name: str
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """Initial values of the fixed tensors, keyed by parameter name (for saving beside the SAE)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.initial.items()}


def apply_baseline(sae: Any, name: str | None) -> BaselineState | None:
    """Fix the part of `sae` (a SAELens training SAE, before its trainer exists) that baseline `name`
    keeps random; None when `name` is None."""
    if not name:
        return None
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")
    frozen = ("W_enc", "b_enc") if name == "frozen-encoder" else ("W_dec",)
    state = BaselineState(name)
    for pname in frozen:
        param = getattr(sae, pname)
        state.initial[pname] = param.detach().clone()
        if name != "soft-frozen-decoder":
            param.requires_grad_(False)
    return state


@torch.no_grad()
def after_step(sae: Any, state: BaselineState | None) -> None:
    """Called after each optimizer step: the soft-frozen projection (see the module docstring)."""
    if state is None or state.name != "soft-frozen-decoder":
        return
    w = sae.W_dec
    u = state.initial["W_dec"].to(w.device, w.dtype)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    norm = w.norm(dim=1, keepdim=True)
    a = (w * u).sum(dim=1, keepdim=True)
    cos = a / norm.clamp_min(1e-12)
    bad = (cos < SOFT_FROZEN_MIN_COSINE).squeeze(1)
    if not bool(bad.any()):
        return
    p = w - a * u
    p_norm = p.norm(dim=1, keepdim=True)
    p_unit = torch.where(p_norm > 1e-12, p / p_norm.clamp_min(1e-12), torch.zeros_like(p))
    c = SOFT_FROZEN_MIN_COSINE
    projected = norm * (c * u + (1 - c * c) ** 0.5 * p_unit)
    w[bad] = projected[bad]


@torch.no_grad()
def frozen_change(sae: Any, state: BaselineState | None) -> float | None:
    """Largest absolute change of the hard-frozen tensors since :func:`apply_baseline` (None when no
    baseline); for ``soft-frozen-decoder`` the smallest row cosine with the initial decoder instead."""
    if state is None:
        return None
    if state.name == "soft-frozen-decoder":
        w, w0 = sae.W_dec, state.initial["W_dec"].to(sae.W_dec.device)
        cos = torch.nn.functional.cosine_similarity(w, w0, dim=1)
        return float(cos.min())
    return max(float((getattr(sae, k) - v.to(getattr(sae, k).device)).abs().max()) for k, v in state.initial.items())
