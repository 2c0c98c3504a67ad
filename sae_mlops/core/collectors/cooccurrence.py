"""Feature co-occurrence on the binary firing matrix B (analysed tokens x features).

Counts: ``n_i = #{t : f_i(t) != 0}``, ``n_ij = #{t : f_i(t) != 0 and f_j(t) != 0}``, ``N = |T|``.
Measures (``measure_from_counts``):

- ``correlation`` (phi coefficient, the default):
  ``(N n_ij - n_i n_j) / sqrt(n_i (N - n_i) n_j (N - n_j))``, 0 where a feature never or always fires;
- ``jaccard``: ``n_ij / (n_i + n_j - n_ij)``, 0 where neither fires;
- ``pmi``: ``log(n_ij N / (n_i n_j))`` (natural log), ``-inf`` where the pair never co-fires,
  NaN where one of the two never fires.

The collector accumulates ``B^T B`` during the pass into a dense ``d_sae x d_sae`` count matrix, so
it is used only up to the dense limit (``--dense-limit``, default 4096: 64 MiB of int32). Each
batch is counted by the cheaper of two exact methods, chosen by the batch's mean number of
non-zeros per row ``L0`` against :func:`dense_min_l0` ``= sqrt(d_sae)`` (the counts are the same
either way):

- dense (``L0 >= sqrt(d_sae)``, and always for codes on an accelerator): ``B^T B`` of the batch's
  rows as one GEMM where the codes are (cost ~ rows x d_sae^2, at BLAS speed). On the CPU an int8
  GEMM with int32 products (``torch._int_mm``; exact below 2^31 rows) on blocks of
  :func:`int8_block_rows` rows gathered over batches, added to the int32 counts; as ``B^T B`` is
  symmetric, only the column blocks on and above the diagonal (:func:`int8_col_blocks`) are
  multiplied, and the blocks below are copied from them (transposed) when the counts are synced;
  elsewhere a float32 GEMM accumulated in a float32 matrix (0/1 products summed in float32 are
  exact integers below 2^24 rows, so the matrix is folded into integer counts before it holds
  2^24 rows); the dense codes never leave the device;
- sparse (``L0 < sqrt(d_sae)``): firing rows are buffered and multiplied as a sparse matrix every
  ``flush_tokens`` tokens (cost ~ rows x L0^2, not rows x d_sae^2), in row blocks on ``workers``
  threads (default: torch's thread count).

Why ``sqrt(d_sae)``: measured with ``scripts/benchmark_cooccurrence.py`` on this project's 2-core
machine (one thread), the two methods cost the same at L0 ~ 16-32 for d_sae 512 and L0 ~ 32 for
d_sae 4096 (SciPy's sparse product gets slower per pair as d_sae grows, the GEMM is ~ d_sae^2; at
d_sae 4096 the crossover was L0 32-64 before the int8 product was cut into blocks, and dense is now
1.6x faster at L0 64); dense is ~10x faster at L0 128 and ~20x at L0 200 for d_sae 512, ~7x at L0 200
for d_sae 4096 (3x before the blocks).

Beyond the dense limit no pair is counted in the pass: neighbours are computed after it, block-wise,
from the activation database's CSR (:func:`sae_mlops.core.matrices.csr_count_blocks`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.state import StateCollector

MEASURES = ("correlation", "jaccard", "pmi")


def measure_from_counts(n_ij, n_i, n_j, n_tokens: int, measure: str) -> np.ndarray:
    """Co-occurrence measure for count blocks: ``n_ij`` [a, b], ``n_i`` [a], ``n_j`` [b] (arrays or
    tensors); float64 math in place on one copy of the block (torch, multi-threaded), float32 out.

    Correlation as ``(N n_ij - n_i n_j) * r_i * r_j`` with ``r = 1 / sqrt(n (N - n))`` (0 where
    ``n`` is 0 or N); Jaccard as ``n_ij / max(n_i + n_j - n_ij, 1)`` (the union is at least 1
    whenever ``n_ij > 0``); PMI as ``log(n_ij N / n_i / n_j)`` (0/0 gives the NaN of a feature that
    never fires, log 0 the -inf of a pair that never co-fires)."""
    if measure not in MEASURES:
        raise ValueError(f"unknown co-occurrence measure {measure!r}; use one of {MEASURES}")
    out = torch.as_tensor(n_ij).to(torch.float64, copy=True)
    ni = torch.as_tensor(n_i).to(torch.float64)
    nj = torch.as_tensor(n_j).to(torch.float64)
    N = float(n_tokens)
    if measure == "correlation":

        def inv_sd(n: torch.Tensor) -> torch.Tensor:
            var = n * (N - n)
            return torch.where(var > 0, var.clamp(min=1e-300).rsqrt(), torch.zeros_like(var))

        out.addr_(ni, nj, beta=N, alpha=-1.0)
        out.mul_(inv_sd(ni)[:, None]).mul_(inv_sd(nj)[None, :])
    elif measure == "jaccard":
        union = torch.neg(out).add_(ni[:, None]).add_(nj[None, :]).clamp_(min=1.0)
        out.div_(union)
    else:
        out.mul_(N).div_(ni[:, None]).div_(nj[None, :]).log_()
    return out.float().cpu().numpy()


def dense_min_l0(d: int) -> float:
    """Mean non-zeros per row from which a batch is counted by a dense GEMM: ``sqrt(d)``."""
    return math.sqrt(d)

#: rows a float32 accumulator may hold before it is folded into integer counts (exact below 2^24)
FLOAT_EXACT_ROWS = (1 << 24) - 1


def int8_gram_available(device: torch.device | str, d: int) -> bool:
    """Whether ``B^T B`` is computed as an int8 GEMM (CPU, torch's ``_int_mm``; d >= 16, as a
    [.., 1] int8 product is wrong in torch 2.13's CPU kernel)."""
    return torch.device(device).type == "cpu" and d >= 16 and hasattr(torch, "_int_mm")


def int8_block_rows(d: int) -> int:
    """Rows gathered into one int8 GEMM on the CPU: ``2 d`` within [1024, 16384] (a buffer of
    ``2 d^2`` bytes, half the counts matrix). One GEMM's fixed cost (its [d, d] int32 product
    written and added to the counts) is paid per block, not per batch: measured on this project's
    2-core machine (one thread) at d_sae 4096, 109 us per row in 512-row GEMMs, 27 in 8192-row
    ones; at d_sae 512, 1.9 us in 512-row ones, 0.8 from 1024."""
    return max(1024, min(16384, 2 * d))


def int8_col_blocks(d: int) -> list[tuple[int, int]]:
    """Column blocks ``[(lo, hi), ...]`` of the int8 ``B^T B``: ``k = ceil(d / w)`` near-equal blocks of
    width about ``w = min(1024, max(512, d // 4))``. Only the ``k (k + 1) / 2`` products on and above
    the diagonal are computed (for k = 4, 10 of 16: the symmetric product's other half is a copy).
    Measured on this project's 2-core machine (one thread, 6.4 % density), per gathered row,
    the whole product against the blocks: d_sae 1024, 1.5 against 1.1 us; 2048, 5.4 against 4.1;
    4096, 21 against 14 (one [d, d] product; 26 with the transposed copy it used to take)."""
    k = max(1, math.ceil(d / min(1024, max(512, d // 4))))
    edges = [round(i * d / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class CooccurrenceCollector(StateCollector):
    """State (declared, merged by sum): ``counts`` [d, d] (``n_ij``, numpy int32: exact below 2^31
    tokens), ``fire`` [d] (``n_i``, numpy int64), ``n_tokens`` (``N``). The buffered rows (sparse
    and int8), the float32 accumulator and the int8 products' blocks below the diagonal are not
    state: :meth:`sync` (= :meth:`_flush`) folds them in."""

    name = "cooccurrence"
    n_tokens: int
    fire: np.ndarray  # [d_sae] int64
    counts: np.ndarray  # [d_sae, d_sae] int32

    def __init__(self, d_sae: int, flush_tokens: int = 32_768, workers: int | None = None, method: str | None = None):
        """method: "sparse" (buffered sparse products), "dense" (per-batch dense ``B^T B`` where the
        codes are; "matmul" is the same) or None: dense for codes on an accelerator, else by each
        batch's mean non-zeros per row (:func:`dense_min_l0`)."""
        if method not in (None, "sparse", "dense", "matmul"):
            raise ValueError(f"unknown counting method {method!r}")
        super().__init__()
        self.d_sae = d_sae
        self.method = "dense" if method == "matmul" else method
        self._acc: torch.Tensor | None = None  # [d, d] float32 on the codes' device
        self._acc_rows = 0
        self._device_counts: torch.Tensor | None = None  # [d, d] int64 on an accelerator
        self._int8_buf: torch.Tensor | None = None  # [int8_block_rows, d] int8: CPU rows awaiting one GEMM
        self._int8_n = 0  # rows filled in _int8_buf
        self._lower_stale = False  # counts below the diagonal blocks lack int8 products (see _mirror)
        self.flush_tokens = flush_tokens
        self.workers = workers or max(1, torch.get_num_threads())
        self.add_state("n_tokens", 0, "sum")
        self.add_state("fire", np.zeros(d_sae, dtype=np.int64), "sum")
        # int32: exact below 2^31 analysed tokens (a pair count is at most the token count), and half the
        # memory and checkpoint bytes of int64 (64 MiB at d_sae 4096)
        self.add_state("counts", np.zeros((d_sae, d_sae), dtype=np.int32), "sum")
        self._buf_rows: list[np.ndarray] = []
        self._buf_cols: list[np.ndarray] = []
        self._buf_n = 0
        self.batches_dense = 0  # batches counted by each method (benchmarks, tests)
        self.batches_sparse = 0

    def use_dense(self, step: StepData) -> bool:
        """Whether this batch is counted by a dense GEMM (see the module docstring)."""
        if self.method is not None:
            return self.method == "dense"
        if step.f.device.type != "cpu":
            return True
        n = step.f.shape[0]
        return n > 0 and step.sparse.cols.numel() >= dense_min_l0(self.d_sae) * n

    def update(self, step: StepData) -> None:
        n = int(step.f.shape[0])
        self.n_tokens += n
        if self.use_dense(step):
            self._dense_update(step.f)
            self.batches_dense += 1
            return
        self.batches_sparse += 1
        sp = step.sparse
        self._buf_rows.append((sp.rows + self._buf_n).numpy().astype(np.int32))  # < flush_tokens + batch
        self._buf_cols.append(sp.cols.numpy().astype(np.int32))
        self._buf_n += n
        if self._buf_n >= self.flush_tokens:
            self._flush()

    def _dense_update(self, f: torch.Tensor) -> None:
        """Add ``B^T B`` and the firing counts of one batch's codes ``f`` [n, d] (``B = f != 0``)."""
        n = int(f.shape[0])
        if n == 0:
            return
        if int8_gram_available(f.device, self.d_sae):
            self._int8_add(f)  # n_i from the product's diagonal (a bool column sum costs as much as the GEMM)
            return
        mask = f != 0
        self.fire += mask.sum(0).cpu().numpy()
        if self._acc_rows + n > FLOAT_EXACT_ROWS:
            self._fold()
        b = mask.float()
        if self._acc is None:
            self._acc = torch.zeros(self.d_sae, self.d_sae, dtype=torch.float32, device=mask.device)
        if n > FLOAT_EXACT_ROWS:  # a batch beyond float32's exact range: in exact pieces
            for s in range(0, n, FLOAT_EXACT_ROWS):
                self._dense_update_rows(b[s : s + FLOAT_EXACT_ROWS])
            return
        self._acc.addmm_(b.T, b)
        self._acc_rows += n

    def _dense_update_rows(self, b: torch.Tensor) -> None:
        assert self._acc is not None
        self._fold()
        self._acc.addmm_(b.T, b)
        self._acc_rows += int(b.shape[0])

    def _int8_add(self, f: torch.Tensor) -> None:
        """Write a CPU batch's binary rows ``f != 0`` straight into the int8 row buffer (allocated
        once, viewed as bool: no boolean batch to allocate and copy, no per-batch int8 copies to
        concatenate), multiplying the buffer out whenever it is full. numpy's comparison writes
        them where its dtype allows (about 5x faster than torch's on the CPU: at d_sae 4096, 0.8
        against 4.2 ms per 1,048-row batch), torch's otherwise (e.g. bfloat16 codes)."""
        cap = int8_block_rows(self.d_sae)
        if self._int8_buf is None:
            self._int8_buf = torch.empty(cap, self.d_sae, dtype=torch.int8)
        codes = f.detach()
        as_numpy = codes.dtype in (torch.float32, torch.float64, torch.float16)
        s, n = 0, int(f.shape[0])
        while s < n:  # a batch may straddle two buffers
            m = min(cap - self._int8_n, n - s)
            rows = self._int8_buf[self._int8_n : self._int8_n + m]
            if as_numpy:
                np.not_equal(codes[s : s + m].numpy(), 0, out=rows.numpy().view(np.bool_))
            else:
                torch.ne(codes[s : s + m], 0, out=rows.view(torch.bool))
            self._int8_n += m
            s += m
            if self._int8_n == cap:
                self._int8_flush()

    def _int8_flush(self) -> None:
        """Add ``B^T B`` of the buffered int8 rows to the counts (int32 products: exact, as a block
        has fewer than 2^31 rows), as products of the column blocks on and above the diagonal
        (:func:`int8_col_blocks`): the blocks below wait for :meth:`_mirror`. The firing counts
        ``n_i`` are the product's diagonal ``n_ii``."""
        if not self._int8_n or self._int8_buf is None:
            return
        b8 = self._int8_buf[: self._int8_n]
        self._int8_n = 0
        blocks = int8_col_blocks(self.d_sae)
        for i, (lo, hi) in enumerate(blocks):
            for lo2, hi2 in blocks[i:]:
                out = self.counts[lo:hi, lo2:hi2]
                prod = torch._int_mm(b8[:, lo:hi].T, b8[:, lo2:hi2]).numpy()
                np.add(out, prod, out=out)
                if lo2 == lo:  # n_ii = n_i: the firing counts are the diagonal's
                    self.fire[lo:hi] += np.diagonal(prod)
        if len(blocks) > 1:
            self._lower_stale = True

    def _mirror(self) -> None:
        """Set the counts below the diagonal blocks to the transpose of those above. Exact whatever
        was added before: every method adds the right counts on and above the diagonal blocks (the
        sparse and float ones add symmetric matrices), so the blocks above always hold the truth."""
        if not self._lower_stale:
            return
        blocks = int8_col_blocks(self.d_sae)
        for i, (lo, hi) in enumerate(blocks):
            for lo2, hi2 in blocks[i + 1 :]:
                np.copyto(self.counts[lo2:hi2, lo:hi], self.counts[lo:hi, lo2:hi2].T)
        self._lower_stale = False

    def _fold(self) -> None:
        """Move the float32 accumulator's exact integer counts into the integer counts."""
        if self._acc is None or self._acc_rows == 0:
            return
        counts = self._acc.round_().to(torch.int64)
        if counts.device.type == "cpu":
            np.add(self.counts, counts.numpy(), out=self.counts, casting="unsafe")
        elif self._device_counts is None:
            self._device_counts = counts
        else:
            self._device_counts += counts
        self._acc.zero_()
        self._acc_rows = 0

    def state_config(self) -> dict[str, Any]:
        return {"d_sae": self.d_sae}

    def sync(self) -> None:
        self._flush()

    def reset(self) -> None:
        super().reset()
        self._acc, self._acc_rows, self._device_counts = None, 0, None
        self._int8_n, self._lower_stale = 0, False
        self._buf_rows, self._buf_cols, self._buf_n = [], [], 0

    def _flush(self) -> None:
        self._int8_flush()
        self._mirror()
        self._fold()
        if self._device_counts is not None:
            self.counts += self._device_counts.cpu().numpy().astype(self.counts.dtype)
            self._device_counts = None
        if self._buf_n == 0:
            return
        rows = np.concatenate(self._buf_rows)
        cols = np.concatenate(self._buf_cols)
        # int32 products: exact (a flush has fewer than 2^31 tokens), and faster than int64
        for prod in _gram_parts(rows, cols, self._buf_n, self.d_sae, np.int32, self.workers):
            if prod.shape[0] * prod.shape[1] <= 1 << 26:  # up to 8192^2: a dense add beats
                # fancy-index adds of the COO entries (~4x at d_sae 4096, k 128)
                np.add(self.counts, prod.toarray(), out=self.counts, casting="unsafe")
            else:
                prod = prod.tocoo()
                self.counts[prod.row, prod.col] += prod.data.astype(self.counts.dtype)
        self.fire += np.bincount(cols, minlength=self.d_sae)
        self._buf_rows, self._buf_cols, self._buf_n = [], [], 0

    def finalize_counts(self) -> np.ndarray:
        self._flush()
        return self.counts

    def matrix(self, measure: str = "correlation") -> np.ndarray:
        """The whole [d, d] measure matrix (small d only: tests and the dense file use row blocks)."""
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
    csr: sp.csr_matrix, k: int, measure: str = "correlation", block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k co-occurrence neighbours of every feature from the firing CSR [tokens, d_sae].

    Works in blocks of ``block`` features (memory ~ block x d_sae), so any d_sae fits.
    Returns (indices [d_sae, k] int64, values [d_sae, k] float32), self excluded, best first,
    ties by the lower feature index.
    """
    from sae_mlops.core.matrices import block_neighbours, csr_count_blocks

    return block_neighbours(csr_count_blocks(csr, measure, block), csr.shape[1], k)
