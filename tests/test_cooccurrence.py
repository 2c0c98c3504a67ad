"""Co-occurrence counts and measures against an independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.cooccurrence import CooccurrenceCollector, neighbours_from_csr


def _f(seed=0, n=60, d=9):
    rng = np.random.default_rng(seed)
    f = rng.uniform(0, 1, (n, d)) * (rng.uniform(0, 1, (n, d)) < 0.3)
    f[:, 2] = 0  # never fires
    f[:, 5] = 1.0  # always fires
    return f.astype(np.float32)


def _collect(f, sizes=(11, 30, 19), flush=16):
    c = CooccurrenceCollector(f.shape[1], flush_tokens=flush)
    start = 0
    for s in sizes:
        t = torch.from_numpy(f[start : start + s])
        c.update(StepData(batch=None, x=t, f=t, x_hat=t))
        start += s
    return c


def _naive(f, measure):
    b = (f != 0).astype(np.int64)
    n, d = b.shape
    out = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            nij = int((b[:, i] & b[:, j]).sum())
            ni, nj = int(b[:, i].sum()), int(b[:, j].sum())
            if measure == "correlation":
                den = math.sqrt(ni * (n - ni) * nj * (n - nj))
                out[i, j] = (n * nij - ni * nj) / den if den > 0 else 0.0
            elif measure == "jaccard":
                u = ni + nj - nij
                out[i, j] = nij / u if u else 0.0
            else:
                out[i, j] = math.nan if ni == 0 or nj == 0 else (-math.inf if nij == 0 else math.log(nij * n / (ni * nj)))
    return out


def test_counts_equal_btb():
    f = _f()
    c = _collect(f)
    b = (f != 0).astype(np.int64)
    np.testing.assert_array_equal(c.finalize_counts(), b.T @ b)
    np.testing.assert_array_equal(c.fire, b.sum(0))


@pytest.mark.parametrize("measure", ["correlation", "jaccard", "pmi"])
def test_measures_match_definitions(measure):
    f = _f(1)
    got = _collect(f).matrix(measure)
    np.testing.assert_allclose(got, _naive(f, measure), rtol=1e-5, atol=1e-6)


def test_merge_equals_single_collector():
    f = _f(2)
    whole = _collect(f)
    a = _collect(f[:25], sizes=(25,))
    b = _collect(f[25:], sizes=(35,))
    a.merge(b)
    np.testing.assert_array_equal(a.finalize_counts(), whole.finalize_counts())
    assert a.n_tokens == whole.n_tokens == 60


def test_blockwise_neighbours_equal_dense_matrix():
    f = _f(3, n=80, d=13)
    dense = _collect(f, sizes=(80,)).matrix("jaccard")
    np.fill_diagonal(dense, -np.inf)
    idx, val = neighbours_from_csr(sp.csr_matrix(f), k=4, measure="jaccard", block=5)
    for i in range(13):
        expected = sorted(range(13), key=lambda j: (-dense[i, j], j))[:4]
        assert idx[i].tolist() == expected
        np.testing.assert_allclose(val[i], dense[i, expected], rtol=1e-6)


@pytest.mark.parametrize("d, workers", [(40, 3), (2100, 2)])
def test_counts_in_parallel_row_blocks_equal_btb(d, workers):
    """Flushes split into row blocks on several threads; d=2100 adds through the sparse path."""
    from sae_mlops.core.collectors.cooccurrence import _gram_parts

    rng = np.random.default_rng(3)
    n = 3 * 4096 + 17
    f = (rng.uniform(0, 1, (n, d)) < 6 / d).astype(np.float32)
    f[100:300] = 0  # empty rows inside a block
    c = CooccurrenceCollector(d, flush_tokens=10_000, workers=workers)
    for start in range(0, n, 2000):
        t = torch.from_numpy(f[start : start + 2000])
        c.update(StepData(batch=None, x=t, f=t, x_hat=t))
    b = (f != 0).astype(np.float64)  # BLAS; exact for these counts
    np.testing.assert_array_equal(c.finalize_counts(), (b.T @ b).astype(np.int64))
    rows, cols = np.nonzero(f)
    assert len(_gram_parts(rows, cols, n, d, np.int64, workers)) == workers  # really split


def _codes_at(density: float, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.1, 1, (n, d)) * (rng.uniform(0, 1, (n, d)) < density)
    f[:, 1] = 0  # never fires
    f[: n // 2, 3] = 0.5  # fires on half the rows
    return f.astype(np.float32)


def _feed(c, f, batch=170):
    for s in range(0, len(f), batch):
        t = torch.from_numpy(f[s : s + batch])
        c.update(StepData(batch=None, x=t, f=t, x_hat=t))
    return c


@pytest.mark.parametrize("density", [0.003, 0.02, 0.05, 0.3, 0.9])  # L0 below and above sqrt(d)
@pytest.mark.parametrize("d", [12, 96])
@pytest.mark.parametrize("float_path", [False, True])
def test_counts_at_any_density_equal_the_sparse_method_and_numpy(monkeypatch, density, d, float_path):
    """Every method (auto by density, sparse, dense), on the int8 GEMM and on the float32 path that
    accelerators take (its accumulator folded every 250 rows here instead of 2^24), gives the
    counts of the sparse method and of an independent numpy count."""
    import sae_mlops.core.collectors.cooccurrence as cooc

    if float_path:
        monkeypatch.setattr(cooc, "int8_gram_available", lambda device, d: False)
        monkeypatch.setattr(cooc, "FLOAT_EXACT_ROWS", 250)
    f = _codes_at(density, 1100, d, seed=d)
    b = (f != 0).astype(np.int64)
    want = b.T @ b
    old = _feed(CooccurrenceCollector(d, flush_tokens=300, method="sparse"), f)
    for method in (None, "dense", "matmul"):
        c = _feed(CooccurrenceCollector(d, flush_tokens=300, method=method), f)
        np.testing.assert_array_equal(c.finalize_counts(), want)
        np.testing.assert_array_equal(c.finalize_counts(), old.finalize_counts())
        np.testing.assert_array_equal(c.fire, b.sum(0))
        assert c.n_tokens == 1100
    auto = _feed(CooccurrenceCollector(d, flush_tokens=300), f)
    dense = [(f[s : s + 170] != 0).sum(1).mean() >= cooc.dense_min_l0(d) for s in range(0, len(f), 170)]
    assert (auto.batches_dense, auto.batches_sparse) == (sum(dense), len(dense) - sum(dense))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_int8_rows_are_the_nonzero_codes_of_every_dtype_and_layout(dtype):
    """The int8 path writes ``f != 0`` straight into its row buffer (numpy's comparison for the
    dtypes numpy has, torch's for bfloat16): counts exact for codes of any float dtype, with
    negative codes, -0.0 (not a firing) and a non-contiguous batch (a column slice of wider codes)."""
    d = 40
    f = _codes_at(0.4, 700, d, seed=7)
    f[::3, 4] *= -1  # negative codes fire
    f[5, 6], f[9, 6] = -0.0, 0.0  # signed zeros do not
    wide = np.concatenate([f, np.ones((len(f), 3), np.float32)], axis=1)
    c = CooccurrenceCollector(d, flush_tokens=300, method="dense")
    for s in range(0, len(f), 170):
        t = torch.from_numpy(wide[s : s + 170])[:, :d].to(dtype)  # strided for float32, a copy otherwise
        c.update(StepData(batch=None, x=t, f=t, x_hat=t))
    b = (f != 0).astype(np.int64)
    np.testing.assert_array_equal(c.finalize_counts(), b.T @ b)
    np.testing.assert_array_equal(c.fire, b.sum(0))


def test_mixed_density_batches_and_merge_count_exactly():
    """Dense and sparse batches in one collector (then merged with another) add up exactly."""
    d = 64
    f = np.concatenate([_codes_at(0.4, 300, d, 1), _codes_at(0.002, 500, d, 2), _codes_at(0.2, 250, d, 3)])
    c = _feed(CooccurrenceCollector(d, flush_tokens=200), f[:600], batch=100)
    assert c.batches_dense and c.batches_sparse
    other = _feed(CooccurrenceCollector(d, flush_tokens=200), f[600:], batch=100)
    c.merge(other)
    b = (f != 0).astype(np.int64)
    np.testing.assert_array_equal(c.finalize_counts(), b.T @ b)
    np.testing.assert_array_equal(c.fire, b.sum(0))


def test_int8_rows_are_counted_in_blocks_of_batches_and_synced_before_export(monkeypatch):
    """On the CPU, dense batches are gathered into one int8 GEMM per `int8_block_rows` rows (not one
    per batch); rows still buffered are counted before the state is exported, and exactly."""
    import sae_mlops.core.collectors.cooccurrence as cooc

    d = 64
    assert cooc.int8_block_rows(d) == 1024 and cooc.int8_block_rows(4096) == 8192 and cooc.int8_block_rows(10**6) == 16384
    gemm_rows: list[int] = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: gemm_rows.append(int(b.shape[0])) or real(a, b))
    f = _codes_at(0.5, 2500, d, 7)
    c = _feed(CooccurrenceCollector(d), f, batch=100)
    assert c.batches_dense == 25
    assert gemm_rows == [1024, 1024]  # the 1024-row buffer filled twice (a batch split across it); 452 rows wait
    b = (f != 0).astype(np.int64)
    state = c.state_dict()
    assert gemm_rows == [1024, 1024, 452]
    np.testing.assert_array_equal(state["counts"].numpy(), b.T @ b)
    np.testing.assert_array_equal(c.fire, b.sum(0))


def test_int8_column_blocks_cover_the_codes_in_near_equal_widths():
    """The blocks of the int8 product partition [0, d) in order, k = ceil(d / w) of them."""
    import sae_mlops.core.collectors.cooccurrence as cooc

    for d, k in ((16, 1), (512, 1), (1024, 2), (2048, 4), (4096, 4), (4100, 5), (16384, 16)):
        blocks = cooc.int8_col_blocks(d)
        assert len(blocks) == k and blocks[0][0] == 0 and blocks[-1][1] == d
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        widths = [hi - lo for lo, hi in blocks]
        assert max(widths) - min(widths) <= 1


@pytest.mark.parametrize("d,width", [(64, 16), (96, 40), (50, 512)])
def test_int8_blocks_above_the_diagonal_give_every_count_through_sparse_batches_merges_and_states(monkeypatch, d, width):
    """With the int8 product cut into column blocks (only those on and above the diagonal
    multiplied), the counts are exact after dense and sparse batches interleaved, a state export
    in the middle, a merge and a reload: the blocks below are filled from those above whenever the
    counts are synced, and never double-count a sparse batch's pairs."""
    import sae_mlops.core.collectors.cooccurrence as cooc

    monkeypatch.setattr(cooc, "int8_col_blocks", lambda n: [(lo, min(lo + width, n)) for lo in range(0, n, width)])
    monkeypatch.setattr(cooc, "int8_block_rows", lambda n: 256)
    parts = [_codes_at(0.4, 300, d, 1), _codes_at(0.01, 400, d, 2), _codes_at(0.3, 333, d, 3),
             _codes_at(0.02, 200, d, 4), _codes_at(0.5, 150, d, 5)]
    f = np.concatenate(parts)
    c = CooccurrenceCollector(d, flush_tokens=150)
    _feed(c, np.concatenate(parts[:2]), batch=90)
    half = c.state_dict()["counts"].numpy().copy()  # synced mid-way: the lower blocks are filled
    b0 = (np.concatenate(parts[:2]) != 0).astype(np.int64)
    np.testing.assert_array_equal(half, b0.T @ b0)
    _feed(c, parts[2], batch=90)
    other = _feed(CooccurrenceCollector(d, flush_tokens=150), np.concatenate(parts[3:]), batch=70)
    c.merge(other)
    assert c.batches_dense and c.batches_sparse
    b = (f != 0).astype(np.int64)
    np.testing.assert_array_equal(c.finalize_counts(), b.T @ b)
    np.testing.assert_array_equal(c.fire, b.sum(0))
    again = CooccurrenceCollector(d)
    again.load_state_dict(c.state_dict())
    _feed(again, parts[0], batch=100)
    b2 = (np.concatenate([f, parts[0]]) != 0).astype(np.int64)
    np.testing.assert_array_equal(again.finalize_counts(), b2.T @ b2)
