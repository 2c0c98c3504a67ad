"""The prior tool's BatchTopK SAE, for inference, with its batch-global rule or a fixed threshold."""

from __future__ import annotations

import math

import torch

BATCH = "batch"
THRESHOLD = "threshold"
TOPK_MODES = (BATCH, THRESHOLD)


class LegacyBatchTopKSAE(torch.nn.Module):
    """BatchTopK SAE exported by the prior tool (``top_k`` set in its ``config.json``).

    Why a hand-written module: SAELens stores a trained BatchTopK SAE for inference as a JumpReLU SAE
    with one shared threshold; the prior tool never estimated a threshold and always analysed with the
    batch-global rule used in training, which no library provides for inference. This module offers
    both, so results can be compared with the prior tool's (``batch``) or made batch-independent
    (``threshold``).

    Math (x: [..., d_in]; the leading dimensions are flattened to n tokens):

    - ``pre_acts(x) = relu((x - b_dec) @ W_enc)`` (the prior tool does not use ``b_enc``; it is kept,
      unused, because the file holds it).
    - ``batch`` mode: of all ``n * d_sae`` values of ``pre_acts`` in one call, keep the ``n * k``
      largest (ties resolved by ``torch.topk``) and zero the rest. A token's code depends on the other
      rows of the call, so call ``encode`` once per batch on exactly the analysed tokens.
    - ``threshold`` mode: ``f = pre * (pre > threshold)`` (JumpReLU with one shared threshold).
    - ``decode(f) = f @ W_dec + b_dec``.
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        k: int,
        mode: str = BATCH,
        threshold: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in TOPK_MODES:
            raise ValueError(f"mode must be one of {TOPK_MODES}, got {mode!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.W_enc = torch.nn.Parameter(W_enc, requires_grad=False)
        self.b_enc = torch.nn.Parameter(b_enc, requires_grad=False)
        self.W_dec = torch.nn.Parameter(W_dec, requires_grad=False)
        self.b_dec = torch.nn.Parameter(b_dec, requires_grad=False)
        self.k = int(k)
        self.mode = mode
        self.threshold = threshold

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """relu((x - b_dec) @ W_enc), in the SAE's dtype."""
        x = x.to(self.W_enc.dtype)
        return torch.relu((x - self.b_dec) @ self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] by the current `mode` (see the class docstring)."""
        pre = self.pre_acts(x)
        if self.mode == THRESHOLD:
            if self.threshold is None:
                raise RuntimeError(
                    "LegacyBatchTopKSAE is in threshold mode but has no threshold: set `.threshold` "
                    "(given by the user or estimated with `min_kept_value`) before encoding."
                )
            return pre * (pre > self.threshold)
        return self._batch_topk(pre)

    def _batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        n_tokens = math.prod(pre.shape[:-1])
        flat = pre.reshape(-1)
        n_keep = min(n_tokens * self.k, flat.numel())
        if n_keep == flat.numel():
            return pre.clone()
        idx = _candidates(flat, n_keep, pre.shape[-1])
        cand = flat if idx is None else flat[idx]
        values, picked = torch.topk(cand, n_keep, sorted=False)
        if idx is not None:
            picked = idx[picked]
        out = torch.zeros_like(flat).scatter_(0, picked, values)
        return out.reshape(pre.shape)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """f @ W_dec + b_dec."""
        return feature_acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def min_kept_value(self, x: torch.Tensor) -> float:
        """Smallest pre-activation kept by the batch rule on this batch (the n*k-th largest value).

        The engine averages it over batches to estimate a threshold for ``threshold`` mode. It is 0.0
        when fewer than n*k pre-activations of the batch are positive.
        """
        pre = self.pre_acts(x)
        n_tokens = math.prod(pre.shape[:-1])
        flat = pre.reshape(-1)
        if flat.numel() == 0:
            raise ValueError("min_kept_value needs at least one token")
        n_keep = min(n_tokens * self.k, flat.numel())
        # the n_keep-th largest value is the (numel - n_keep + 1)-th smallest
        return float(torch.kthvalue(flat, flat.numel() - n_keep + 1).values)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}, mode={self.mode!r}, threshold={self.threshold}"


def _candidates(flat: torch.Tensor, n_keep: int, d_sae: int, stride: int = 17, margin: float = 1.25) -> torch.Tensor | None:
    """Indices of a superset of the ``n_keep`` largest values of non-negative ``flat`` (rows of
    ``d_sae`` values), or None (take all).

    Why: ``torch.topk`` over all n * d_sae values costs ~5 ns per value on a CPU. A lower bound
    ``lo`` comes from a sample (every ``stride``-th value, the stride coprime to ``d_sae`` so that
    every feature is sampled): the value with ``margin`` times the expected share of kept values
    above it. If fewer than ``n_keep`` values are >= lo (an unlucky sample) the positive values are
    used instead, and if even those are too few, everything. The kept set is exactly topk's: every
    value >= the n_keep-th largest is a candidate (ties at that value may be broken differently,
    with identical values)."""
    numel = flat.numel()
    if numel < 64 * stride:
        return None
    while d_sae % stride == 0:
        stride += 2
    sample = flat[::stride]
    want = math.ceil(n_keep * sample.numel() / numel * margin) + 8
    if want < sample.numel():
        lo = torch.kthvalue(sample, sample.numel() - want + 1).values
        if lo > 0:
            idx = (flat >= lo).nonzero().squeeze(1)
            if idx.numel() >= n_keep:
                return idx
    idx = (flat > 0).nonzero().squeeze(1)
    return idx if idx.numel() >= n_keep else None
