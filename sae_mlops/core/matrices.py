"""Feature-by-feature matrices and neighbour lists, computed in row blocks (no d_sae x d_sae array).

- Decoder similarity: ``sim_ij = cos(W_dec[i], W_dec[j])`` (rows are features), on the device
  that holds ``W_dec``.
- Co-occurrence: counts ``n_ij`` and the measures of :mod:`sae_mlops.core.collectors.cooccurrence`,
  either from a dense count matrix (``d_sae <= dense_limit``: the pass counted the pairs) or, block
  by block, from the binary firing CSR [tokens, d_sae] of the activation database:
  ``n_ij`` for the features i of a block = ``B[:, block]^T B`` (a sparse product; cost ~ the
  block's pair occurrences), so the count matrix is never whole in memory.

Every consumer takes ``(start, stop, block [stop-start, d_sae])`` row blocks with about
``BLOCK_ELEMENTS`` entries each, so memory is a few blocks whatever d_sae:

- neighbour lists (always): per feature the ``k`` largest values, self excluded, best first, ties
  by the lower feature index, NaN ranked last (:func:`top_k_rows`); Parquet ``feature`` int32,
  ``rank`` int16, ``neighbour`` int32, ``value`` float32;
- dense ``.npy`` float32 ``[d_sae, d_sae]`` matrices only while ``d_sae <= dense_limit``, written
  through a memory map block by block;
- heatmaps take a chosen subset of features only (:func:`similarity_submatrix`,
  :func:`cooccurrence_submatrix`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from sae_mlops.core.collectors.cooccurrence import measure_from_counts
from sae_mlops.files import atomic_write, umask

#: entries per row block (16M: 64 MB of float32, 128 MB of float64 temporaries)
BLOCK_ELEMENTS = 1 << 24

Blocks = Iterator[tuple[int, int, "np.ndarray | torch.Tensor"]]


def block_rows(d: int, elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per block so that a [rows, d] block holds about ``elements`` entries."""
    return max(1, min(d, elements // max(d, 1)))


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Decoder rows scaled to unit L2 norm (float32, on the weights' device)."""
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def similarity_blocks(w_dec: torch.Tensor, block: int | None = None) -> Blocks:
    """Yield (start, stop, cosine block [stop-start, d_sae] as a tensor on W_dec's device)."""
    u = unit_rows(w_dec)
    d = u.shape[0]
    block = block or block_rows(d)
    for start in range(0, d, block):
        stop = min(start + block, d)
        yield start, stop, u[start:stop] @ u.T


def similarity_submatrix(w_dec: torch.Tensor, features: np.ndarray) -> np.ndarray:
    """Cosine similarity among ``features`` only: [m, m] float32."""
    u = unit_rows(w_dec[torch.as_tensor(features, dtype=torch.long, device=w_dec.device)])
    return (u @ u.T).cpu().numpy()


def dense_count_blocks(counts: np.ndarray, fire: np.ndarray, n_tokens: int, measure: str, block: int | None = None) -> Blocks:
    """Co-occurrence measure blocks from a dense count matrix ``counts`` [d, d]."""
    d = counts.shape[0]
    block = block or block_rows(d)
    for start in range(0, d, block):
        stop = min(start + block, d)
        yield start, stop, measure_from_counts(counts[start:stop], fire[start:stop], fire, n_tokens, measure)


def binary_csr(csr: sp.csr_matrix) -> sp.csr_matrix:
    """The firing pattern of an activation CSR: the same structure with float32 ones."""
    return sp.csr_matrix((np.ones(len(csr.indices), dtype=np.float32), csr.indices, csr.indptr), shape=csr.shape)


def csr_count_blocks(csr: sp.csr_matrix, measure: str, block: int | None = None, workers: int | None = None) -> Blocks:
    """Co-occurrence measure blocks from the activation CSR [tokens, d_sae], in feature order.

    Block counts ``B[:, a:b]^T B`` are sparse products (SciPy releases the GIL), computed
    ``workers`` blocks at a time in threads; only those blocks are ever dense."""
    b = binary_csr(csr)
    n_tokens, d = b.shape
    fire = np.bincount(b.indices, minlength=d).astype(np.int64)
    bt = b.T.tocsr()  # [d, tokens]
    block = block or block_rows(d)
    workers = workers or max(1, torch.get_num_threads())
    starts = list(range(0, d, block))

    def one(start: int) -> tuple[int, int, np.ndarray]:
        stop = min(start + block, d)
        counts = (bt[start:stop] @ b).toarray()
        return start, stop, measure_from_counts(counts, fire[start:stop], fire, n_tokens, measure)

    if workers == 1 or len(starts) == 1:
        for s in starts:
            yield one(s)
        return
    with ThreadPoolExecutor(workers) as pool:
        for i in range(0, len(starts), workers):  # at most `workers` blocks in memory
            yield from pool.map(one, starts[i : i + workers])


def cooccurrence_submatrix(csr: sp.csr_matrix, features: np.ndarray, measure: str) -> np.ndarray:
    """The co-occurrence measure among ``features`` only, from the activation CSR: [m, m]."""
    b = binary_csr(csr)[:, np.asarray(features)]
    fire = np.asarray(b.sum(axis=0)).ravel()
    return measure_from_counts((b.T @ b).toarray(), fire, fire, b.shape[0], measure)


def _exact_top_k(w: torch.Tensor, kth: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Column indices [rows, k] of the k largest entries of each row of ``w`` whose k-th largest
    value is ``kth`` [rows, 1]: every entry above it, then the entries equal to it in column
    order, as many as fit; sorted by value (descending), equal values by column; ``exclude``
    [rows]: a column per row never taken. Works on the entries >= kth only (found in one pass),
    not on whole rows."""
    cand = w >= kth
    if exclude is not None:
        cand[torch.arange(w.shape[0], device=w.device), exclude] = False
    rows, cols = cand.nonzero(as_tuple=True)  # by row, then ascending column
    v = w[rows, cols]
    is_eq = v == kth[rows, 0]
    n_ge = torch.bincount(rows, minlength=w.shape[0])
    n_eq = torch.bincount(rows, weights=is_eq.double(), minlength=w.shape[0]).long()
    start = torch.cumsum(n_eq, 0) - n_eq  # equal entries before each row
    eq_rank = torch.cumsum(is_eq.long(), 0) - start[rows]  # 1-based rank among the row's equal ones
    room = k - (n_ge - n_eq)
    keep = ~is_eq | (eq_rank <= room[rows])
    c = cols[keep].view(w.shape[0], k)
    order = torch.sort(v[keep].view(w.shape[0], k), dim=1, descending=True, stable=True).indices
    return c.gather(1, order)


def top_k_rows(m: np.ndarray | torch.Tensor, k: int, exclude_offset: int | None = None,
               nan: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest entries (indices int64, values float32), best first; ties by lower
    column index, NaN last. ``exclude_offset`` = s drops the diagonal of a block whose row r is
    feature s + r (no self-neighbour). ``nan=False`` promises the block holds no NaN (skips a
    pass over it). Runs on the block's device.

    ``torch.topk`` (of k + 1) on the values, then the order made exact: rows whose k-th value also
    occurs outside the selection (the (k+1)-th equals it), or with equal values inside it, are
    redone by :func:`_exact_top_k`."""
    t = torch.as_tensor(m)
    if t.dim() != 2:
        raise ValueError("top_k_rows takes a 2-D block")
    rows, cols = t.shape
    k = min(k, cols)
    t = t.float()
    r = torch.arange(rows, device=t.device)
    diag = None
    if exclude_offset is not None:
        diag = t[r, r + exclude_offset].clone()
        t[r, r + exclude_offset] = float("-inf")
    try:
        work = torch.where(torch.isnan(t), float("-inf"), t) if nan and bool(torch.isnan(t).any()) else t
        # k + 1 largest: the k-th value was left out somewhere iff the (k+1)-th equals it (the
        # largest value not selected); no pass over the whole row (a bool row count cost 2-3x topk)
        k1 = min(k + 1, cols)
        val, idx = torch.topk(work, k1, dim=1, largest=True, sorted=True)
        ties = val[:, k] == val[:, k - 1] if k1 > k else torch.zeros(rows, dtype=torch.bool, device=t.device)
        val, idx = val[:, :k], idx[:, :k].contiguous()
        kth = val[:, -1:]
        if k > 1:
            ties |= (val[:, 1:] == val[:, :-1]).any(dim=1)  # equal values inside: order by column
        redo = ties.nonzero().flatten()
        if redo.numel():
            idx[redo] = _exact_top_k(work[redo], kth[redo], k, None if exclude_offset is None else redo + exclude_offset)
        out = work.gather(1, idx)
    finally:
        if diag is not None:
            t[r, r + exclude_offset] = diag  # type: ignore[operator]  # the caller's block is left as it was
    return idx.cpu().numpy(), out.cpu().numpy()


def block_neighbours(blocks: Blocks, d: int, k: int, sink=None, nan: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours (self excluded) of every feature from (start, stop, block) row blocks.

    ``sink(start, stop, block)``, when given, also sees every block (to write a dense file in the
    same sweep); ``nan=False``: the blocks hold no NaN (see :func:`top_k_rows`). Returns
    (indices [d, k] int64, values [d, k] float32)."""
    k = min(k, max(d - 1, 1))
    idx = np.zeros((d, k), dtype=np.int64)
    val = np.zeros((d, k), dtype=np.float32)
    for start, stop, blk in blocks:
        if sink is not None:
            sink(start, stop, blk)
        idx[start:stop], val[start:stop] = top_k_rows(blk, k, exclude_offset=start if d > 1 else None, nan=nan)
    return idx, val


class DenseWriter:
    """A [d, d] float32 ``.npy`` filled block by block (``__call__`` is a :func:`block_neighbours`
    sink), written to a temporary path and published by :meth:`close`."""

    def __init__(self, path: Path, d: int):
        self.path = Path(path)
        self.d = d
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.mm: np.memmap | None = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(d, d))

    def __call__(self, start: int, stop: int, blk) -> None:
        assert self.mm is not None, "DenseWriter used after close/abort"
        self.mm[start:stop] = blk.cpu().numpy() if isinstance(blk, torch.Tensor) else blk

    def close(self) -> Path:
        assert self.mm is not None, "DenseWriter closed twice"
        self.mm.flush()
        self.mm = None
        os.chmod(self.tmp, 0o666 & ~umask())  # mkstemp makes 0600; artifacts are shared (0644 under umask 022)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file (on error)."""
        self.mm = None
        self.tmp.unlink(missing_ok=True)


def write_dense_blocks(path: Path, d: int, blocks: Blocks) -> Path:
    """Write a [d, d] float32 .npy from (start, stop, block) row chunks, atomically."""
    w = DenseWriter(path, d)
    try:
        for start, stop, blk in blocks:
            w(start, stop, blk)
    except BaseException:
        w.abort()
        raise
    return w.close()


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


def write_neighbours(path: Path, idx: np.ndarray, val: np.ndarray) -> Path:
    frame = neighbours_frame(idx, val)
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def dense_row_blocks(matrix: np.ndarray, block: int | None = None) -> Blocks:
    block = block or block_rows(matrix.shape[0])
    for start in range(0, matrix.shape[0], block):
        stop = min(start + block, matrix.shape[0])
        yield start, stop, matrix[start:stop]
