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

from typing import Any

import torch

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.state import StateCollector, TopK


def context_ids(tokens: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor, window: int) -> torch.Tensor:
    """[n_rows, 2w+1] token ids around each analysed position (row-major order of ``rows`` mask).

    ``keep`` marks positions whose token may appear in a context (real document tokens).
    """
    ids = torch.where(keep, tokens, torch.full_like(tokens, -1))
    padded = torch.nn.functional.pad(ids, (window, window), value=-1)
    return padded.unfold(1, 2 * window + 1, 1)[rows].to(torch.int32)


class TopExamplesCollector(StateCollector):
    """State: one :class:`~sae_mlops.core.collectors.state.TopK` group ordered by ``value``
    descending, ties by ``token`` ascending, unfilled slots (value -inf, token -1) last; so the
    generic :meth:`merge` of shards (token indices global) equals one pass over their tokens."""

    name = "examples"
    value: torch.Tensor  # [d_sae, k] float32, -inf where unfilled
    token: torch.Tensor  # [d_sae, k] int64 global token index, -1 where unfilled
    doc: torch.Tensor  # [d_sae, k] int64 document index
    pos: torch.Tensor  # [d_sae, k] int64 position in the document
    ctx: torch.Tensor  # [d_sae, k, 2 window + 1] int32 context token ids, -1 where none

    def __init__(self, d_sae: int, k: int = 25, window: int = 10):
        super().__init__()
        self.d_sae, self.k, self.window = d_sae, k, window
        width = 2 * window + 1
        group = TopK(key="value", tie="token")
        self.add_state("value", torch.full((d_sae, k), float("-inf"), dtype=torch.float32), group)
        self.add_state("token", torch.full((d_sae, k), -1, dtype=torch.int64), group)
        self.add_state("doc", torch.full((d_sae, k), -1, dtype=torch.int64), group)
        self.add_state("pos", torch.full((d_sae, k), -1, dtype=torch.int64), group)
        self.add_state("ctx", torch.full((d_sae, k, width), -1, dtype=torch.int32), group)

    def state_config(self) -> dict[str, Any]:
        return {"d_sae": self.d_sae, "k": self.k, "window": self.window}

    # -- collector protocol ----------------------------------------------------------------
    def update(self, step: StepData) -> None:
        """Fold in one batch of a single pass: batches come in stream order (every token of this
        batch is later than every kept one); shards of a corpus are combined with the generic
        :meth:`merge` (their ``token_start`` global)."""
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
