"""Feature-by-feature matrices and neighbour lists.

- Decoder similarity: ``sim_ij = cos(W_dec[i], W_dec[j])`` (rows are features).
- Co-occurrence: see :mod:`sae_mlops.collectors.cooccurrence`.

Dense ``d_sae x d_sae`` float32 ``.npy`` files are written (in row chunks, through a memory map)
only while ``d_sae <= dense_limit``; top-k neighbour lists per feature (Parquet: feature,
rank, neighbour, value) are written always. Both are computed in row blocks, so memory is
``block x d_sae`` whatever the size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sae_mlops.collectors.cooccurrence import top_k_rows
from sae_mlops.writers.files import atomic_write


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def similarity_blocks(w_dec: torch.Tensor, block: int = 2048):
    """Yield (start, stop, cosine block [stop-start, d_sae]) of the decoder-row similarity."""
    u = unit_rows(w_dec)
    for start in range(0, u.shape[0], block):
        stop = min(start + block, u.shape[0])
        yield start, stop, (u[start:stop] @ u.T).numpy()


def write_dense_blocks(path: Path, d: int, blocks) -> Path:
    """Write a [d, d] float32 .npy from (start, stop, block) row chunks, atomically."""

    def write(tmp: Path) -> None:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(d, d))
        for start, stop, blk in blocks:
            mm[start:stop] = blk
        mm.flush()
        del mm

    return atomic_write(path, write)


def neighbours_frame(idx: np.ndarray, val: np.ndarray) -> pd.DataFrame:
    d, k = idx.shape
    return pd.DataFrame(
        {
            "feature": np.repeat(np.arange(d, dtype=np.int32), k),
            "rank": np.tile(np.arange(k, dtype=np.int16), d),
            "neighbour": idx.ravel().astype(np.int32),
            "value": val.ravel().astype(np.float32),
        }
    )


def block_neighbours(blocks, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours (self excluded) from (start, stop, block) row chunks."""
    k = min(k, max(d - 1, 1))
    idx = np.zeros((d, k), dtype=np.int64)
    val = np.zeros((d, k), dtype=np.float32)
    for start, stop, blk in blocks:
        blk = np.nan_to_num(np.array(blk, dtype=np.float32, copy=True), nan=-np.inf)
        blk[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        idx[start:stop], val[start:stop] = top_k_rows(blk, k)
    return idx, val


def write_neighbours(path: Path, idx: np.ndarray, val: np.ndarray) -> Path:
    frame = neighbours_frame(idx, val)
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def dense_row_blocks(matrix: np.ndarray, block: int = 2048):
    for start in range(0, matrix.shape[0], block):
        stop = min(start + block, matrix.shape[0])
        yield start, stop, matrix[start:stop]
