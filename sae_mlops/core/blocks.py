"""Blocks of whole windows: the resampling unit of every interval and paired comparison.

A pass's windows, in stream order (document, then offset in the document), are cut into about
``TARGET_BLOCKS`` contiguous blocks of ``ceil(n_windows / TARGET_BLOCKS)`` windows each. The cut is a
pure function of the token plan (corpus, tokenizer, context size, BOS rule, batch size and budget),
so two analyses of one plan have the same blocks, and block ``b`` of one is block ``b`` of the other:
their per-block sums pair block by block (see :mod:`sae_mlops.core.intervals`).

Why blocks of windows and not tokens: tokens of one window (and of one document) are strongly
dependent, so resampling tokens would understate the noise; resampling contiguous blocks of whole
windows keeps that dependence inside a block (a moving-block-free, non-overlapping block bootstrap,
Künsch 1989 / Carlstein 1986). Why a few hundred: enough blocks for a percentile bootstrap to be
accurate, few enough that per-block per-feature counts stay small (``n_blocks x d_sae`` int32).

A window is identified by ``key = doc_index * 2**32 + start`` (``start``: its first document token's
offset); block ``b`` holds the windows with ``starts[b] <= key < starts[b + 1]``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

TARGET_BLOCKS = 256  #: blocks per pass (fewer when the pass has fewer windows)
_SHIFT = 2**32


def window_key(doc_index: int, start: int) -> int:
    """The stream-order key of a window (document index, then token offset within the document)."""
    return int(doc_index) * _SHIFT + int(start)


@dataclass(frozen=True)
class BlockLayout:
    """Where each block starts: ``starts[b]`` is the key of block b's first window (ascending)."""

    starts: tuple[int, ...]
    windows: int  # windows in the pass

    @property
    def n_blocks(self) -> int:
        return len(self.starts)

    @classmethod
    def from_keys(cls, keys: list[int], target: int = TARGET_BLOCKS) -> BlockLayout:
        """Cut the pass's window keys (stream order) into at most ``target`` blocks of
        ``ceil(len(keys) / target)`` consecutive windows."""
        if not keys:
            return cls((0,), 0)
        per = -(-len(keys) // max(target, 1))
        return cls(tuple(keys[i] for i in range(0, len(keys), per)), len(keys))

    def block_of(self, doc_index: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """[n] int64 block indices of windows given their document indices and start offsets."""
        keys = doc_index.long().cpu() * _SHIFT + start.long().cpu()
        bounds = torch.tensor(self.starts, dtype=torch.long)
        return (torch.searchsorted(bounds, keys, right=True) - 1).clamp(min=0)

    def to_dict(self) -> dict[str, Any]:
        return {"starts": list(self.starts), "windows": self.windows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockLayout:
        return cls(tuple(int(s) for s in d["starts"]), int(d["windows"]))

    def digest(self) -> str:
        """Short hash of the layout: equal digests, equal blocks."""
        return hashlib.sha256(json.dumps(self.to_dict()).encode()).hexdigest()[:16]
