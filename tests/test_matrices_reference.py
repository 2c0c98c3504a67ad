"""The block-wise similarity / co-occurrence code paths against dense numpy computations.

Reference: the whole d x d matrix computed densely in numpy float64 from its definition, and each
feature's neighbours by a plain Python sort (value descending, ties by the lower feature index,
NaN last, self excluded). Codes are small and binary-patterned so that many values tie.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.cooccurrence import MEASURES, CooccurrenceCollector
from sae_mlops.core.matrices import (
    block_neighbours,
    cooccurrence_submatrix,
    csr_count_blocks,
    dense_count_blocks,
    similarity_blocks,
    similarity_submatrix,
    top_k_rows,
    write_dense_blocks,
)

D, N, K = 37, 400, 6


def _codes(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.4, D)
    f = (rng.uniform(0, 1, (N, D)) < p) * rng.uniform(0.1, 2.0, (N, D))
    f[:, 3] = 0  # dead
    f[:, 7] = 1.5  # always fires
    f[:, 11] = f[:, 12]  # identical firing patterns: tied values
    return f.astype(np.float32)


def _reference_matrix(f: np.ndarray, measure: str) -> np.ndarray:
    b = (f != 0).astype(np.float64)
    n_ij = b.T @ b
    n = b.sum(0)
    N_ = float(len(b))
    out = np.zeros((D, D))
    for i in range(D):
        for j in range(D):
            nij, ni, nj = n_ij[i, j], n[i], n[j]
            if measure == "correlation":
                den = math.sqrt(ni * (N_ - ni) * nj * (N_ - nj))
                out[i, j] = (N_ * nij - ni * nj) / den if den > 0 else 0.0
            elif measure == "jaccard":
                u = ni + nj - nij
                out[i, j] = nij / u if u else 0.0
            else:
                out[i, j] = math.nan if ni == 0 or nj == 0 else (-math.inf if nij == 0 else math.log(nij * N_ / (ni * nj)))
    return out.astype(np.float32)


def _reference_neighbours(m: np.ndarray, k: int) -> list[list[int]]:
    def key(i: int, j: int):
        v = float(m[i, j])
        return (-(-math.inf if math.isnan(v) else v), j)

    return [sorted((j for j in range(len(m)) if j != i), key=lambda j, i=i: key(i, j))[:k] for i in range(len(m))]


def _check(idx: np.ndarray, val: np.ndarray, ref: np.ndarray, k: int) -> None:
    expected = _reference_neighbours(ref, k)
    assert idx.shape == (len(ref), k) and idx.dtype == np.int64 and val.dtype == np.float32
    for i in range(len(ref)):
        assert idx[i].tolist() == expected[i], f"feature {i}"
        want = np.nan_to_num(ref[i, expected[i]], nan=-np.inf)
        np.testing.assert_allclose(val[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("block, workers", [(None, 1), (5, 1), (8, 3)])
def test_csr_blocks_equal_dense_reference(measure, block, workers):
    f = _codes()
    ref = _reference_matrix(f, measure)
    blocks = list(csr_count_blocks(sp.csr_matrix(f), measure, block=block, workers=workers))
    assert [b[0] for b in blocks] == sorted(b[0] for b in blocks)  # feature order
    whole = np.concatenate([b[2] for b in blocks])
    np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-6)
    idx, val = block_neighbours(iter(blocks), D, K)
    _check(idx, val, ref, K)


@pytest.mark.parametrize("method", ["sparse", "matmul"])
@pytest.mark.parametrize("measure", MEASURES)
def test_collector_counts_and_dense_blocks_equal_reference(method, measure):
    f = _codes(1)
    c = CooccurrenceCollector(D, flush_tokens=64, method=method)
    for s in range(0, N, 90):
        t = torch.from_numpy(f[s : s + 90])
        c.update(StepData(batch=None, x=t, f=t, x_hat=t))
    b = (f != 0).astype(np.int64)
    np.testing.assert_array_equal(c.finalize_counts(), b.T @ b)
    np.testing.assert_array_equal(c.fire, b.sum(0))
    ref = _reference_matrix(f, measure)
    idx, val = block_neighbours(dense_count_blocks(c.finalize_counts(), c.fire, c.n_tokens, measure, block=4), D, K)
    _check(idx, val, ref, K)


def test_dense_file_and_submatrix_equal_reference(tmp_path):
    f = _codes(2)
    ref = _reference_matrix(f, "correlation")
    path = write_dense_blocks(tmp_path / "m.npy", D, csr_count_blocks(sp.csr_matrix(f), "correlation", block=6))
    np.testing.assert_allclose(np.load(path), ref, rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npy"]  # no temporary left
    sub = np.array([1, 7, 11, 12, 30])
    np.testing.assert_allclose(cooccurrence_submatrix(sp.csr_matrix(f), sub, "correlation"), ref[np.ix_(sub, sub)], rtol=1e-5, atol=1e-6)


def test_similarity_neighbours_equal_dense_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, 8, generator=g)
    w[5] = w[2] * 3.0  # same direction: cosine ties with feature 2's neighbours
    w[9] = w[2]
    u = w.double().numpy()
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    ref = (u @ u.T).astype(np.float32)
    for block in (None, 4, 10):
        idx, val = block_neighbours(similarity_blocks(w, block=block), D, K)
        expected = _reference_neighbours(ref, K)
        for i in range(D):
            # float32 cosines of exact ties may differ in the last bit: compare values, and the
            # order wherever the reference values are not within rounding of each other
            np.testing.assert_allclose(val[i], ref[i, expected[i]], rtol=1e-5, atol=1e-6)
            assert set(idx[i].tolist()) - set(expected[i]) <= {j for j in range(D) if abs(ref[i, j] - ref[i, expected[i][-1]]) < 1e-6}
    assert {int(idx[2, 0]), int(idx[2, 1])} == {5, 9}
    sub = np.array([0, 2, 5, 9])
    np.testing.assert_allclose(similarity_submatrix(w, sub), ref[np.ix_(sub, sub)], rtol=1e-5, atol=1e-6)


def test_top_k_rows_ties_nan_and_self_exclusion():
    rng = np.random.default_rng(4)
    m = rng.integers(-2, 3, (50, 60)).astype(np.float32)  # many ties
    m[3, :] = np.nan
    m[4, ::2] = -np.inf
    m[5, 10] = -0.0
    before = m.copy()
    for k in (1, 5, 59):
        idx, val = top_k_rows(m, k, exclude_offset=7)
        for i in range(50):
            row = [(-(-np.inf if np.isnan(v) else v), j) for j, v in enumerate(m[i]) if j != i + 7]
            want = [j for _, j in sorted(row)[:k]]
            assert idx[i].tolist() == want, (k, i)
        np.testing.assert_array_equal(m, before)  # the caller's block is untouched
    assert np.isneginf(top_k_rows(m, 3)[1][3]).all()  # NaN ranks last and reads as -inf
    for k in (2, 60):  # no exclusion; k = the row length (no (k+1)-th value to compare with)
        idx, _ = top_k_rows(m, k)
        for i in range(50):
            want = [j for _, j in sorted((-(-np.inf if np.isnan(v) else v), j) for j, v in enumerate(m[i]))[:k]]
            assert idx[i].tolist() == want, (k, i)
