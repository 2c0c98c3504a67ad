"""Streaming top-k activating examples per feature, with their contexts.

For every feature we keep the ``k`` largest non-zero activations seen so far, ordered by
activation (descending) and, among equal activations, by global token index (stream order,
ascending) -- so the result equals sorting all (activation, token) pairs of the corpus, whatever
the batch boundaries. Each kept example carries its document index, position in the document and
the token ids of a +-``window`` context cut from its window (-1 where the window has no token:
outside it, padding, or the BOS we prepended).

Per batch only candidates that can enter the top-k are touched: values at least the batch's own
k-th largest and the feature's current k-th (ties included, so the tie rule stays exact).
Memory: ``d_sae * k * (2 * window + 5)`` numbers, independent of corpus size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_mlops.collectors.base import StepData


@dataclass
class Examples:
    """Flat example records: one row each."""

    feature: torch.Tensor  # int64
    value: torch.Tensor  # float32
    token: torch.Tensor  # int64 global token index
    doc: torch.Tensor  # int64
    pos: torch.Tensor  # int64
    ctx: torch.Tensor  # int32 [m, 2w+1]

    def take(self, idx: torch.Tensor) -> "Examples":
        return Examples(*(getattr(self, f)[idx] for f in ("feature", "value", "token", "doc", "pos", "ctx")))

    @staticmethod
    def cat(parts: list["Examples"]) -> "Examples":
        return Examples(*(torch.cat([getattr(p, f) for p in parts]) for f in ("feature", "value", "token", "doc", "pos", "ctx")))


def context_ids(tokens: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor, window: int) -> torch.Tensor:
    """[n_rows, 2w+1] token ids around each analysed position (row-major order of ``rows`` mask).

    ``keep`` marks positions whose token may appear in a context (real document tokens).
    """
    ids = torch.where(keep, tokens, torch.full_like(tokens, -1))
    padded = torch.nn.functional.pad(ids, (window, window), value=-1)
    return padded.unfold(1, 2 * window + 1, 1)[rows].to(torch.int32)


class TopExamplesCollector:
    name = "examples"

    def __init__(self, d_sae: int, k: int = 25, window: int = 10):
        self.d_sae, self.k, self.window = d_sae, k, window
        width = 2 * window + 1
        self.value = torch.full((d_sae, k), float("-inf"), dtype=torch.float32)
        self.token = torch.full((d_sae, k), -1, dtype=torch.int64)
        self.doc = torch.full((d_sae, k), -1, dtype=torch.int64)
        self.pos = torch.full((d_sae, k), -1, dtype=torch.int64)
        self.ctx = torch.full((d_sae, k, width), -1, dtype=torch.int32)

    # -- state as flat records ------------------------------------------------------------
    def _records(self, features: torch.Tensor | None = None) -> Examples:
        rows = torch.arange(self.d_sae) if features is None else features
        filled = self.token[rows] >= 0
        feat = rows[:, None].expand(-1, self.k)[filled]
        return Examples(feat, self.value[rows][filled], self.token[rows][filled], self.doc[rows][filled],
                        self.pos[rows][filled], self.ctx[rows][filled])

    def _store(self, features: torch.Tensor, records: Examples) -> None:
        """Replace the kept examples of ``features`` by the best k of ``records`` (sorted)."""
        order = torch.argsort(records.token, stable=True)
        order = order[torch.argsort(-records.value[order], stable=True)]
        order = order[torch.argsort(records.feature[order], stable=True)]
        r = records.take(order)
        start = torch.searchsorted(r.feature, r.feature)  # first row of each feature's group
        rank = torch.arange(len(r.feature)) - start
        keep = rank < self.k
        r, rank = r.take(keep), rank[keep]
        self.value[features] = float("-inf")
        self.token[features] = -1
        self.doc[features] = -1
        self.pos[features] = -1
        self.ctx[features] = -1
        self.value[r.feature, rank] = r.value
        self.token[r.feature, rank] = r.token
        self.doc[r.feature, rank] = r.doc
        self.pos[r.feature, rank] = r.pos
        self.ctx[r.feature, rank] = r.ctx

    # -- collector protocol ----------------------------------------------------------------
    def update(self, step: StepData) -> None:
        f = step.f.detach().float().cpu()
        n = f.shape[0]
        if n == 0:
            return
        threshold = self.value[:, -1]  # current k-th (-inf while not full)
        mask = (f >= threshold[None, :]) & (f != 0)
        heavy = torch.nonzero(mask.sum(dim=0) > self.k).flatten()
        if heavy.numel():
            # features with more than k candidates in this batch: only their batch top-k can enter
            kth = torch.topk(f[:, heavy], self.k, dim=0).values[-1]
            mask[:, heavy] &= f[:, heavy] >= kth[None, :]
        rows, feats = mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        batch = step.batch
        analysed = batch.analysed
        keep = batch.valid & (batch.doc_pos >= 0)
        ctx = context_ids(batch.tokens, keep, analysed, self.window)[rows]
        new = Examples(feats, f[rows, feats], step.token_start + rows, batch.doc_index[:, None].expand_as(analysed)[analysed][rows],
                       batch.doc_pos[analysed][rows], ctx)
        affected = torch.unique(feats)
        self._store(affected, Examples.cat([self._records(affected), new]))

    def merge(self, other: "TopExamplesCollector") -> None:
        everything = torch.arange(self.d_sae)
        self._store(everything, Examples.cat([self._records(), other._records()]))

    def compute(self) -> dict[str, Any]:
        return {}

    def examples(self, feature: int) -> list[dict[str, Any]]:
        """The kept examples of one feature, best first: value, token (global index), doc, pos, ctx ids."""
        return self.all_examples([feature])[0]

    def all_examples(self, features: list[int] | None = None) -> list[list[dict[str, Any]]]:
        """Kept examples for many features at once (tensors converted to Python once, not per item)."""
        rows = torch.arange(self.d_sae) if features is None else torch.as_tensor(features, dtype=torch.long)
        filled = (self.token[rows] >= 0).sum(dim=1).tolist()
        value, token = self.value[rows].tolist(), self.token[rows].tolist()
        doc, pos, ctx = self.doc[rows].tolist(), self.pos[rows].tolist(), self.ctx[rows].tolist()
        return [
            [
                {"activation": value[r][i], "global_idx": token[r][i], "text_idx": doc[r][i],
                 "position": pos[r][i], "context_ids": ctx[r][i]}
                for i in range(filled[r])
            ]
            for r in range(len(filled))
        ]
