"""Streaming top-k activating examples per feature, with their contexts.

For every feature we keep the ``k`` largest non-zero activations seen so far, ordered by
activation (descending) and, among equal activations, by global token index (stream order,
ascending) -- so the result equals sorting all (activation, token) pairs of the corpus, whatever
the batch boundaries. Each kept example carries its document index, position in the document and
the token ids of a +-``window`` context cut from its window (-1 where the window has no token:
outside it, padding, or the BOS we prepended).

Per batch only candidates that can enter the top-k are touched: the batch's non-zero codes
(``StepData.sparse``) at least the feature's current k-th value, and of those only each feature's
batch top-k by (value desc, token asc) -- exact, since any other candidate is beaten by k of the
same batch.
Memory: ``d_sae * k * (2 * window + 5)`` numbers, independent of corpus size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_mlops.core.collectors.base import StepData


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
        """Fold in one batch of a single pass: batches come in stream order (every token of this
        batch is later than every kept one); shards of a corpus are combined with :meth:`merge`."""
        sp = step.sparse
        # candidates: non-zero values at least the feature's current k-th (-inf while not full)
        cand = sp.values >= self.value[sp.cols, -1]
        rows, feats, vals = sp.rows[cand], sp.cols[cand], sp.values[cand]
        if rows.numel() == 0:
            return
        # of each feature's candidates, only its batch top-k by (value desc, token asc) can enter
        # the kept top-k; rows are ascending, and both sorts are stable
        order = torch.argsort(-vals, stable=True)
        order = order[torch.argsort(feats[order], stable=True)]
        rows, feats, vals = rows[order], feats[order], vals[order]
        rank = torch.arange(len(feats)) - torch.searchsorted(feats, feats)
        first = rank < self.k
        rows, feats, vals = rows[first], feats[first], vals[first]
        batch = step.batch
        analysed = batch.analysed
        keep = batch.valid & (batch.doc_pos >= 0)
        ctx = context_ids(batch.tokens, keep, analysed, self.window)[rows]
        affected, group = torch.unique_consecutive(feats, return_inverse=True)
        # the batch's examples as a dense [a, k] block per affected feature (rank = column)
        a, k = len(affected), self.k
        slot = group * k + rank[first]
        blocks = {
            "value": (vals, float("-inf")),
            "token": (step.token_start + rows, -1),
            "doc": (batch.doc_index[:, None].expand_as(analysed)[analysed][rows], -1),
            "pos": (batch.doc_pos[analysed][rows], -1),
        }
        merged = {}
        for name, (data, fill) in blocks.items():
            block = torch.full((a * k,), fill, dtype=getattr(self, name).dtype)
            block[slot] = data.to(block.dtype)
            merged[name] = torch.cat([getattr(self, name)[affected], block.view(a, k)], dim=1)
        new_ctx = torch.full((a * k, ctx.shape[1]), -1, dtype=torch.int32)
        new_ctx[slot] = ctx
        merged["ctx"] = torch.cat([self.ctx[affected], new_ctx.view(a, k, -1)], dim=1)
        # kept examples (earlier tokens) come first and every new token is later, so a stable sort
        # by value alone keeps the (value desc, token asc) order exactly
        best = torch.argsort(-merged["value"], dim=1, stable=True)[:, :k]
        for name in ("value", "token", "doc", "pos"):
            getattr(self, name)[affected] = merged[name].gather(1, best)
        self.ctx[affected] = merged["ctx"].gather(1, best[:, :, None].expand(-1, -1, merged["ctx"].shape[2]))

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
