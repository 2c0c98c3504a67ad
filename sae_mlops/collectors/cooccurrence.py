"""Feature co-occurrence on the binary firing matrix B (analysed tokens x features).

Counts: ``n_i = #{t : f_i(t) != 0}``, ``n_ij = #{t : f_i(t) != 0 and f_j(t) != 0}``, ``N = |T|``.
Measures (``measure_from_counts``):

- ``correlation`` (phi coefficient, the default):
  ``(N n_ij - n_i n_j) / sqrt(n_i (N - n_i) n_j (N - n_j))``, 0 where a feature never or always fires;
- ``jaccard``: ``n_ij / (n_i + n_j - n_ij)``, 0 where neither fires;
- ``pmi``: ``log(n_ij N / (n_i n_j))`` (natural log), ``-inf`` where the pair never co-fires,
  NaN where one of the two never fires.

The collector accumulates ``B^T B`` during the pass, buffering firing rows and multiplying them
as a sparse matrix every ``flush_tokens`` tokens (cost ~ tokens x L0^2, not tokens x d_sae^2),
in row blocks on ``workers`` threads (default: torch's thread count).
It holds a dense ``d_sae x d_sae`` count matrix, so it is used only up to the configured dense
limit; beyond it, neighbours are computed block-wise from the activation database's CSR export
(:func:`neighbours_from_csr`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from sae_mlops.collectors.base import StepData

MEASURES = ("correlation", "jaccard", "pmi")


def measure_from_counts(n_ij: np.ndarray, n_i: np.ndarray, n_j: np.ndarray, n_tokens: int, measure: str) -> np.ndarray:
    """Co-occurrence measure for count blocks: ``n_ij`` [a, b], ``n_i`` [a], ``n_j`` [b] (float64 math)."""
    nij = n_ij.astype(np.float64)
    ni = n_i.astype(np.float64)[:, None]
    nj = n_j.astype(np.float64)[None, :]
    N = float(n_tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
        if measure == "correlation":
            denom = np.sqrt(ni * (N - ni) * nj * (N - nj))
            out = np.where(denom > 0, (N * nij - ni * nj) / np.where(denom > 0, denom, 1), 0.0)
        elif measure == "jaccard":
            union = ni + nj - nij
            out = np.where(union > 0, nij / np.where(union > 0, union, 1), 0.0)
        elif measure == "pmi":
            out = np.log(nij * N / (ni * nj))
            out = np.where((ni > 0) & (nj > 0), out, np.nan)
        else:
            raise ValueError(f"unknown co-occurrence measure {measure!r}; use one of {MEASURES}")
    return out.astype(np.float32)


class CooccurrenceCollector:
    name = "cooccurrence"

    def __init__(self, d_sae: int, flush_tokens: int = 32_768, workers: int | None = None):
        self.d_sae = d_sae
        self.flush_tokens = flush_tokens
        self.workers = workers or max(1, torch.get_num_threads())
        self.n_tokens = 0
        self.fire = np.zeros(d_sae, dtype=np.int64)
        dtype = np.int64 if d_sae <= 8192 else np.int32  # int32 keeps 16384^2 at 1 GiB; exact below 2^31
        self.counts = np.zeros((d_sae, d_sae), dtype=dtype)
        self._buf_rows: list[np.ndarray] = []
        self._buf_cols: list[np.ndarray] = []
        self._buf_n = 0

    def update(self, step: StepData) -> None:
        sp = step.sparse
        self._buf_rows.append((sp.rows + self._buf_n).numpy().astype(np.int32))  # < flush_tokens + batch
        self._buf_cols.append(sp.cols.numpy().astype(np.int32))
        self._buf_n += step.f.shape[0]
        self.n_tokens += step.f.shape[0]
        if self._buf_n >= self.flush_tokens:
            self._flush()

    def _flush(self) -> None:
        if self._buf_n == 0:
            return
        rows = np.concatenate(self._buf_rows)
        cols = np.concatenate(self._buf_cols)
        for prod in _gram_parts(rows, cols, self._buf_n, self.d_sae, self.counts.dtype, self.workers):
            if prod.shape[0] * prod.shape[1] <= 1 << 22:  # small: a dense add beats fancy indexing
                self.counts += prod.toarray()
            else:
                prod = prod.tocoo()
                self.counts[prod.row, prod.col] += prod.data.astype(self.counts.dtype)
        self.fire += np.bincount(cols, minlength=self.d_sae)
        self._buf_rows, self._buf_cols, self._buf_n = [], [], 0

    def merge(self, other: "CooccurrenceCollector") -> None:
        self._flush()
        other._flush()
        self.counts += other.counts
        self.fire += other.fire
        self.n_tokens += other.n_tokens

    def finalize_counts(self) -> np.ndarray:
        self._flush()
        return self.counts

    def matrix(self, measure: str = "correlation") -> np.ndarray:
        counts = self.finalize_counts()
        return measure_from_counts(counts, self.fire, self.fire, self.n_tokens, measure)

    def compute(self) -> dict[str, Any]:
        return {}


def _gram(rows: np.ndarray, cols: np.ndarray, lo: int, hi: int, d: int, dtype) -> sp.csr_matrix:
    """``B^T B`` of the binary rows ``lo..hi`` of B, given B's non-zeros sorted by row."""
    n = hi - lo
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows - lo, minlength=n), out=indptr[1:])
    b = sp.csr_matrix((np.ones(len(rows), dtype=dtype), cols, indptr), shape=(n, d))
    return b.T @ b


def _gram_parts(rows: np.ndarray, cols: np.ndarray, n: int, d: int, dtype, workers: int,
                min_rows: int = 4096) -> list[sp.csr_matrix]:
    """``B^T B`` for the binary [n, d] matrix with non-zeros (rows, cols), sorted by row, as the
    sum of the returned matrices: one per block of rows, computed in parallel threads (SciPy's
    sparse products release the GIL, and the pass waits for the flush anyway)."""
    parts = max(1, min(workers, n // min_rows))
    edges = np.linspace(0, n, parts + 1).astype(np.int64)
    cuts = np.searchsorted(rows, edges)
    jobs = [(rows[a:b], cols[a:b], int(lo), int(hi), d, dtype)
            for a, b, lo, hi in zip(cuts[:-1], cuts[1:], edges[:-1], edges[1:], strict=True)]
    if parts == 1:
        return [_gram(*jobs[0])]
    with ThreadPoolExecutor(parts) as pool:
        return list(pool.map(lambda job: _gram(*job), jobs))


def neighbours_from_csr(
    csr: sp.csr_matrix, k: int, measure: str = "correlation", block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k co-occurrence neighbours of every feature from the binary firing CSR [tokens, d_sae].

    Works in blocks of ``block`` features (memory ~ block x d_sae), so any d_sae fits.
    Returns (indices [d_sae, k] int64, values [d_sae, k] float32), self excluded, best first.
    """
    b = csr.copy()
    b.data = np.ones_like(b.data, dtype=np.float32)
    n_tokens, d_sae = b.shape
    fire = np.asarray(b.sum(axis=0)).ravel()
    bt = b.T.tocsr()
    idx = np.zeros((d_sae, k), dtype=np.int64)
    val = np.zeros((d_sae, k), dtype=np.float32)
    for start in range(0, d_sae, block):
        stop = min(start + block, d_sae)
        counts = (bt[start:stop] @ b).toarray()
        m = measure_from_counts(counts, fire[start:stop], fire, n_tokens, measure)
        m = np.nan_to_num(m, nan=-np.inf)
        m[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # no self-neighbour
        idx[start:stop], val[start:stop] = top_k_rows(m, k)
    return idx, val


def top_k_rows(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest entries (indices, values), best first; ties by lower column index."""
    t = torch.from_numpy(np.ascontiguousarray(m))
    k = min(k, t.shape[1])
    order = torch.argsort(-t, dim=1, stable=True)[:, :k]
    return order.numpy(), torch.gather(t, 1, order).numpy()
