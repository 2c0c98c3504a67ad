"""Per-block sufficient statistics: the sums behind every headline metric, kept per block of windows.

For each block ``b`` of :class:`~sae_mlops.core.blocks.BlockLayout` this collector keeps the very sums
that the sparsity, reconstruction and downstream collectors keep for the whole pass (``n_tokens``,
``sum_l0``, ..., ``sum_sq_err``, ..., ``sum_ce_sae``, ...), plus the per-block sum of ``x`` ([B, d_in],
for the explained variance) and the per-block firing counts of every feature ([B, d_sae] int32, for
the dead / rare / dense counts). Summed over blocks they are the collectors' own sums; summed with
bootstrap weights they are a resampled pass, from which :mod:`sae_mlops.core.intervals` recomputes
each metric with the collectors' own formulas (``sparsity_metrics``, ``reconstruction_metrics``,
``downstream_metrics``). The per-token terms come from the same functions the collectors use
(``per_token_sparsity``, ``per_token_reconstruction``, computed once per batch and shared), so there is
one definition of each metric.

State is declared (``add_state``, reduce ``sum``), so shards, resume and Ray actors merge it like
any other collector's and give the same per-block sums as one local pass. Memory: ``B x (d_in + 20)``
float64 plus ``B x d_sae`` int32 (B <= 256: 64 MiB at d_sae 65,536); above ``MAX_FIRE_ENTRIES``
(B x d_sae) the firing counts are not kept and the feature-count metrics get no interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sae_mlops.core.blocks import BlockLayout
from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.downstream import SUM_NAMES as DOWNSTREAM_SUMS
from sae_mlops.core.collectors.reconstruction import TERM_NAMES as RECON_TERMS
from sae_mlops.core.collectors.reconstruction import token_reconstruction
from sae_mlops.core.collectors.sparsity import token_sparsity
from sae_mlops.core.collectors.state import StateCollector

MAX_FIRE_ENTRIES = 2**25  #: largest B x d_sae for which per-block firing counts are kept (128 MiB)

#: per-token sums kept per block (float64 [B]); counts (n_tokens, n_pred, n_kl) are int64 [B]
SPARSITY_TERMS = ("sum_l0", "sum_l0_sq", "sum_l1", "sum_l1_sq")
CE_TERMS = ("sum_ce_clean", "sum_ce_sae", "sum_ce_zero")
KL_TERMS = ("sum_kl_sae", "sum_kl_zero")
FLOAT_SUMS = SPARSITY_TERMS + RECON_TERMS + CE_TERMS + KL_TERMS
COUNTS = ("n_tokens", "n_pred", "n_kl")
assert set(DOWNSTREAM_SUMS) == set(CE_TERMS + KL_TERMS + ("n_pred", "n_kl"))


class BlockStatsCollector(StateCollector):
    """The sums of the headline metrics per block of windows (see the module docstring)."""

    name = "blocks"
    n_tokens: torch.Tensor  # [B] int64
    n_pred: torch.Tensor  # [B] int64
    n_kl: torch.Tensor  # [B] int64
    sum_x: torch.Tensor  # [B, d_in] float64
    fire_count: torch.Tensor  # [B, d_sae] int32 ([0, d_sae] when not kept)

    def __init__(self, layout: BlockLayout, d_in: int, d_sae: int, downstream: bool = True):
        super().__init__()
        self.layout = layout
        self.d_in, self.d_sae = d_in, d_sae
        self.downstream = downstream
        nb = layout.n_blocks
        self.keep_fire = nb * d_sae <= MAX_FIRE_ENTRIES
        for name in COUNTS:
            self.add_state(name, torch.zeros(nb, dtype=torch.int64), "sum")
        for name in FLOAT_SUMS:
            self.add_state(name, torch.zeros(nb, dtype=torch.float64), "sum")
        self.add_state("sum_x", torch.zeros(nb, d_in, dtype=torch.float64), "sum")
        self.add_state("fire_count", torch.zeros(nb if self.keep_fire else 0, d_sae, dtype=torch.int32), "sum")

    def state_config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_sae": self.d_sae, "blocks": self.layout.n_blocks,
                "layout": self.layout.digest(), "fire": self.keep_fire}

    def update(self, step: StepData) -> None:
        batch = step.batch
        analysed = batch.analysed.cpu()
        wblock = self.layout.block_of(batch.doc_index, batch.starts)  # [windows]
        rblock = wblock[analysed.nonzero(as_tuple=True)[0]]  # [n] block of each analysed row
        n = int(rblock.numel())
        if n == 0:
            return
        uniq, inv = torch.unique(rblock, return_inverse=True)
        nu = int(uniq.numel())
        sp = step.sparse
        l0, l1 = token_sparsity(step)  # computed once per batch, shared with the sparsity collector
        recon = token_reconstruction(step)
        l0f = l0.double()
        terms = [l0f, l0f * l0f, l1, l1 * l1] + [recon[k].double().cpu() for k in RECON_TERMS]
        if self.downstream and step.kl_sae is not None and step.kl_zero is not None:
            terms += [step.kl_sae.double().cpu(), step.kl_zero.double().cpu()]
        per_block = torch.zeros(nu, len(terms), dtype=torch.float64).index_add_(0, inv, torch.stack(terms, dim=1))
        names = list(SPARSITY_TERMS + RECON_TERMS) + (list(KL_TERMS) if len(terms) > 10 else [])
        for j, name in enumerate(names):
            getattr(self, name)[uniq] += per_block[:, j]
        counts = torch.bincount(inv, minlength=nu)
        self.n_tokens[uniq] += counts
        if len(terms) > 10:
            self.n_kl[uniq] += counts
        dev = step.x.device
        sx = torch.zeros(nu, self.d_in, dtype=torch.float64, device=dev).index_add_(0, inv.to(dev), step.x.double())
        self.sum_x[uniq] += sx.cpu()
        if self.keep_fire and sp.rows.numel():
            flat = (inv * self.d_sae)[sp.rows] + sp.cols  # row offsets scaled once per row, not per non-zero
            self.fire_count[uniq] += torch.bincount(flat, minlength=nu * self.d_sae).view(nu, self.d_sae).int()
        if self.downstream and step.ce_clean is not None:
            assert step.ce_sae is not None and step.ce_zero is not None
            pblock = wblock[batch.predicts.cpu().nonzero(as_tuple=True)[0]]
            pu, pinv = torch.unique(pblock, return_inverse=True)
            ce = torch.stack([step.ce_clean.double().cpu(), step.ce_sae.double().cpu(), step.ce_zero.double().cpu()], 1)
            ce_block = torch.zeros(int(pu.numel()), 3, dtype=torch.float64).index_add_(0, pinv, ce)
            for j, name in enumerate(CE_TERMS):
                getattr(self, name)[pu] += ce_block[:, j]
            self.n_pred[pu] += torch.bincount(pinv, minlength=int(pu.numel()))

    def compute(self) -> dict[str, Any]:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every per-block state as a numpy array with the block axis first."""
        self.sync()
        return {name: getattr(self, name).numpy() for name in self.state_names}
