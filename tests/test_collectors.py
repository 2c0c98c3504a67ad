"""Each metric against an independent numpy computation on small tensors, fed in uneven batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.downstream import DownstreamCollector
from sae_mlops.core.collectors.reconstruction import ReconstructionCollector
from sae_mlops.core.collectors.sparsity import SparsityCollector

SIZES = [7, 1, 13]  # uneven batches: a mean of batch means would differ from the token mean


def _data(seed=0, d_in=6, d_sae=10):
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    x = rng.normal(3.0, 2.0, size=(n, d_in)) * np.array([10, 1, 1, 1, 1, 0.1])[:d_in]
    x_hat = x + rng.normal(0, 0.5, size=x.shape)
    f = np.maximum(rng.normal(-0.5, 1.0, size=(n, d_sae)), 0)
    f[:, 3] = 0  # a dead feature
    f[:, 4] = 0
    f[5, 4] = 2.5  # a rare feature: one firing
    return x.astype(np.float32), x_hat.astype(np.float32), f.astype(np.float32)


def _steps(x, x_hat, f, **extra):
    out, start = [], 0
    for size in SIZES:
        sl = slice(start, start + size)
        kw = {k: torch.from_numpy(v[sl]) for k, v in extra.items()}
        out.append(StepData(batch=None, x=torch.from_numpy(x[sl]), f=torch.from_numpy(f[sl]),
                            x_hat=torch.from_numpy(x_hat[sl]), **kw))
        start += size
    return out


def test_sparsity_matches_numpy():
    x, x_hat, f = _data()
    c = SparsityCollector(f.shape[1], rare_threshold=0.05, dense_threshold=0.5)
    for s in _steps(x, x_hat, f):
        c.update(s)
    m = c.compute()
    l0 = (f != 0).sum(1)
    l1 = np.abs(f).sum(1)
    assert m["sparsity/l0_mean"] == pytest.approx(l0.mean())
    assert m["sparsity/l0_std"] == pytest.approx(l0.std())  # population std
    assert m["sparsity/l1_mean"] == pytest.approx(l1.mean(), rel=1e-6)
    assert m["sparsity/l1_std"] == pytest.approx(l1.std(), rel=1e-5)
    freq = (f != 0).mean(0)
    assert m["features/dead_count"] == int((freq == 0).sum()) == 1
    assert m["features/rare_count"] == int(((freq > 0) & (freq < 0.05)).sum()) == 1
    assert m["features/dense_count"] == int((freq > 0.5).sum())
    assert m["features/dead_fraction"] == pytest.approx(1 / f.shape[1])
    pf = c.per_feature()
    np.testing.assert_allclose(pf["frequency"], freq)
    fired = (f != 0).sum(0)
    mean_act = np.where(fired > 0, f.sum(0) / np.maximum(fired, 1), 0)
    np.testing.assert_allclose(pf["mean_activation"], mean_act, rtol=1e-6)
    np.testing.assert_allclose(pf["max_activation"], f.max(0), rtol=1e-6)
    np.testing.assert_array_equal(c.l0_hist.numpy(), np.bincount(l0, minlength=f.shape[1] + 1))


def test_per_token_terms_are_computed_once_per_batch_and_shared_by_the_collectors(monkeypatch):
    """The sparsity and reconstruction collectors sum per-token terms that the block statistics sum
    again: each batch computes them once (``StepData.shared``), and both collectors still match numpy."""
    from sae_mlops.core.collectors import reconstruction, sparsity

    calls = {"sparsity": 0, "reconstruction": 0}
    real_s, real_r = sparsity.per_token_sparsity, reconstruction.per_token_reconstruction

    def count_s(*a, **k):
        calls["sparsity"] += 1
        return real_s(*a, **k)

    def count_r(*a, **k):
        calls["reconstruction"] += 1
        return real_r(*a, **k)

    monkeypatch.setattr(sparsity, "per_token_sparsity", count_s)
    monkeypatch.setattr(reconstruction, "per_token_reconstruction", count_r)
    x, x_hat, f = _data(2)
    steps = _steps(x, x_hat, f)
    cs, cr = SparsityCollector(f.shape[1], 0.05, 0.5), ReconstructionCollector(x.shape[1])
    for s in steps:
        cs.update(s)
        cr.update(s)
        assert sparsity.token_sparsity(s) is sparsity.token_sparsity(s)  # the same tensors, not recomputed
        reconstruction.token_reconstruction(s)
    assert calls == {"sparsity": len(SIZES), "reconstruction": len(SIZES)}
    assert cs.compute()["sparsity/l1_mean"] == pytest.approx(np.abs(f).sum(1).mean(), rel=1e-6)
    mse = ((x - x_hat) ** 2).sum(1).mean()
    assert cr.sum_sq_err / cr.n == pytest.approx(mse, rel=1e-5)


def test_reconstruction_matches_numpy():
    x, x_hat, f = _data(1)
    c = ReconstructionCollector(x.shape[1])
    for s in _steps(x, x_hat, f):
        c.update(s)
    m = c.compute()
    xd, xh = x.astype(np.float64), x_hat.astype(np.float64)
    err = ((xd - xh) ** 2).sum(1)
    assert m["recon/mse_per_token"] == pytest.approx(err.mean(), rel=1e-6)
    assert m["recon/mse_per_element"] == pytest.approx(err.mean() / x.shape[1], rel=1e-6)
    total_var = ((xd - xd.mean(0)) ** 2).sum(1).mean()  # per-dimension variance about the mean, summed
    assert m["recon/explained_variance"] == pytest.approx(1 - err.mean() / total_var, rel=1e-6)
    pooled = 1 - ((xd - xh) ** 2).mean() / xd.var()  # prior tool: all elements pooled
    assert m["recon/explained_variance_pooled"] == pytest.approx(pooled, rel=1e-6)
    assert m["recon/explained_variance_pooled"] != pytest.approx(m["recon/explained_variance"], rel=1e-3)
    cos = (xd * xh).sum(1) / np.linalg.norm(xd, axis=1) / np.linalg.norm(xh, axis=1)
    assert m["recon/cosine"] == pytest.approx(cos.mean(), rel=1e-6)
    ratio = np.linalg.norm(xh, axis=1) / np.linalg.norm(xd, axis=1)
    assert m["recon/l2_ratio"] == pytest.approx(ratio.mean(), rel=1e-6)
    bias = (np.linalg.norm(xh, axis=1) ** 2).mean() / (xd * xh).sum(1).mean()
    assert m["recon/relative_reconstruction_bias"] == pytest.approx(bias, rel=1e-6)


def test_downstream_matches_numpy_and_is_per_token():
    x, x_hat, f = _data(2)
    rng = np.random.default_rng(3)
    n = x.shape[0]
    ce_clean = rng.uniform(1, 2, n).astype(np.float32)
    ce_sae = ce_clean + rng.uniform(0, 0.5, n).astype(np.float32)
    ce_zero = ce_clean + rng.uniform(2, 4, n).astype(np.float32)
    kl_sae = rng.uniform(0, 0.1, n).astype(np.float32)
    kl_zero = rng.uniform(1, 2, n).astype(np.float32)
    c = DownstreamCollector()
    for s in _steps(x, x_hat, f, ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero, kl_sae=kl_sae, kl_zero=kl_zero):
        c.update(s)
    m = c.compute()
    assert m["downstream/ce_clean"] == pytest.approx(ce_clean.mean(), rel=1e-6)
    assert m["downstream/ce_sae"] == pytest.approx(ce_sae.mean(), rel=1e-6)
    rec = (ce_zero.mean() - ce_sae.mean()) / (ce_zero.mean() - ce_clean.mean())
    prior = 1 - (ce_sae.mean() - ce_clean.mean()) / (ce_zero.mean() - ce_clean.mean())
    assert m["downstream/loss_recovered"] == pytest.approx(rec, rel=1e-5)
    assert m["downstream/loss_recovered"] == pytest.approx(prior, rel=1e-5)
    assert m["downstream/kl_score"] == pytest.approx(1 - kl_sae.mean() / kl_zero.mean(), rel=1e-5)
    batch_means = np.mean([ce_clean[:7].mean(), ce_clean[7:8].mean(), ce_clean[8:].mean()])
    assert m["downstream/ce_clean"] != pytest.approx(batch_means, rel=1e-4)


def test_loss_recovered_nan_with_warning_when_zero_ablation_does_not_hurt():
    t = torch.ones(4)
    c = DownstreamCollector()
    c.update(StepData(batch=None, x=t, f=t, x_hat=t, ce_clean=t * 2, ce_sae=t * 2.5, ce_zero=t * 1.5,
                      kl_sae=t * 0.1, kl_zero=t * 0.2))
    m = c.compute()
    assert math.isnan(m["downstream/loss_recovered"])
    assert c.warnings and "zero-ablation" in c.warnings[0]


@pytest.mark.parametrize("cls,args", [(SparsityCollector, (10,)), (ReconstructionCollector, (6,)), (DownstreamCollector, ())])
def test_merge_equals_single_pass(cls, args):
    x, x_hat, f = _data(4)
    n = x.shape[0]
    extra = {k: np.random.default_rng(i).uniform(0, 3, n).astype(np.float32)
             for i, k in enumerate(["ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"])}
    steps = _steps(x, x_hat, f, **extra)
    whole = cls(*args)
    for s in steps:
        whole.update(s)
    a, b = cls(*args), cls(*args)
    a.update(steps[0])
    for s in steps[1:]:
        b.update(s)
    a.merge(b)
    mw, ma = whole.compute(), a.compute()
    assert mw.keys() == ma.keys()
    for k in mw:
        assert ma[k] == pytest.approx(mw[k], rel=1e-9, nan_ok=True), k
