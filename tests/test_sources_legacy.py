"""Prior-format SAE directories: the math of both kinds against numpy, metadata, and bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sae_mlops.errors import InputError
from sae_mlops.sources.legacy_batchtopk import LegacyBatchTopKSAE
from sae_mlops.sources.sae import load_sae


def weights_np(path):
    state = torch.load(path / "weights.pt", weights_only=True)
    return {k: v.double().numpy() for k, v in state.items() if v.dtype != torch.bool}


def relu(a):
    return np.maximum(a, 0.0)


def test_standard_sae_is_saelens_with_prior_math(make_legacy_sae):
    path = make_legacy_sae(d_in=8, d_sae=16)
    loaded = load_sae(str(path))
    from sae_lens import StandardSAE

    assert isinstance(loaded.module, StandardSAE)
    w = weights_np(path)
    x = np.random.default_rng(1).normal(size=(6, 8))
    f = loaded.module.encode(torch.tensor(x, dtype=torch.float32)).double().numpy()
    expected = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-5)
    x_hat = loaded.module.decode(torch.tensor(f, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(x_hat, f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    assert 0 < (f > 0).sum() < f.size  # the check is not vacuous


def test_standard_sae_info(make_legacy_sae):
    path = make_legacy_sae(model_name="gpt2", context_size=64, prepend_bos=False)
    info = load_sae(str(path)).info
    assert (info.format, info.architecture) == ("legacy", "standard")
    assert (info.hook_name, info.hook_layer, info.d_in, info.d_sae) == ("blocks.0.hook_resid_post", 0, 8, 16)
    assert (info.model_name, info.context_size, info.prepend_bos) == ("gpt2", 64, False)
    assert info.history == {"loss": [3.0, 2.0], "sparsity": [40.0, 20.0], "val_loss": [3.1, 2.2]}
    state = torch.load(path / "weights.pt", weights_only=True)
    assert torch.equal(info.ever_fired, state["ever_fired"])
    assert info.k is None and info.topk_mode is None
    assert info.local_path == path.resolve() and len(info.content_hash) == 64


def test_content_hash_changes_with_weights(make_legacy_sae):
    a = load_sae(str(make_legacy_sae(name="a", seed=0))).info.content_hash
    b = load_sae(str(make_legacy_sae(name="b", seed=0))).info.content_hash
    c = load_sae(str(make_legacy_sae(name="c", seed=1))).info.content_hash
    assert a == b != c


def test_hook_from_layer_and_name_without_spec(make_legacy_sae):
    path = make_legacy_sae(hook_spec=None, hook_layer="3", hook_name="hook_resid_pre")
    info = load_sae(str(path)).info
    assert info.hook_name == "blocks.3.hook_resid_pre" and info.hook_layer == 3


def test_model_name_from_prior_directory_name(make_legacy_sae):
    path = make_legacy_sae(name="Qwen_Qwen3-0.6B.blocks.0.hook_resid_post.btop4sae.sci.exp4", top_k=4)
    info = load_sae(str(path)).info
    assert info.model_name == "Qwen/Qwen3-0.6B"
    assert info.extra["model_name_from"] == "directory name"


def batch_rule_np(pre: np.ndarray, k: int) -> np.ndarray:
    flat = pre.reshape(-1)
    keep = np.argsort(-flat, kind="stable")[: pre.shape[0] * k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(pre.shape)


def test_batchtopk_batch_rule_matches_numpy(make_legacy_sae):
    k, n = 3, 5
    path = make_legacy_sae(top_k=k, d_in=8, d_sae=16)
    loaded = load_sae(str(path))
    sae = loaded.module
    assert isinstance(sae, LegacyBatchTopKSAE)
    assert (loaded.info.architecture, loaded.info.k, loaded.info.topk_mode) == ("batchtopk", k, "batch")
    w = weights_np(path)
    x = np.random.default_rng(2).normal(size=(n, 8))
    pre = relu((x - w["b_dec"]) @ w["W_enc"])  # no b_enc
    assert (pre > 0).sum() > n * k  # enough candidates, so the rule really selects
    f = sae.encode(torch.tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(f, batch_rule_np(pre, k), rtol=1e-5, atol=1e-6)
    assert (f != 0).sum() == n * k  # no ties with continuous random inputs
    per_token_l0 = (f != 0).sum(axis=1)
    assert per_token_l0.sum() == n * k and len(set(per_token_l0.tolist())) > 1  # global, not per token
    x_hat = sae.decode(torch.tensor(f, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(x_hat, f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    kept = np.sort(pre.reshape(-1))[::-1][n * k - 1]
    assert sae.min_kept_value(torch.tensor(x, dtype=torch.float32)) == pytest.approx(kept, rel=1e-5)


@pytest.mark.parametrize("case", ["gaussian", "heavy_tail", "few_positive", "one_huge"])
def test_batchtopk_large_batches_keep_exactly_the_global_top_values(case):
    """Batches large enough for the sampled candidate search keep exactly what a full sort keeps."""
    from sae_mlops.sources.legacy_batchtopk import _candidates

    g = torch.Generator().manual_seed(7)
    n, d_in, d_sae, k = 96, 16, 256, 8
    sae = LegacyBatchTopKSAE(torch.randn(d_in, d_sae, generator=g), torch.zeros(d_sae),
                             torch.randn(d_sae, d_in, generator=g), torch.zeros(d_in), k)
    x = torch.randn(n, d_in, generator=g)
    if case == "heavy_tail":
        x = x * torch.rand(n, 1, generator=g).pow(6) * 50
    elif case == "few_positive":  # fewer than n * k positive pre-activations: all positives kept
        sae.b_dec.data = torch.full((d_in,), 0.0)
        sae.W_enc.data = sae.W_enc.data.abs() * -1
        sae.W_enc.data[:, :3] *= -1
        x = x.abs()
    elif case == "one_huge":
        x[0] *= 1e4
    pre = sae.pre_acts(x)
    assert pre.numel() >= 64 * 17  # the sampled candidate search is taken unless it must fall back
    f = sae.encode(x).double().numpy()
    np.testing.assert_array_equal(f, batch_rule_np(pre.double().numpy(), k))
    positives = int((pre > 0).sum())
    assert int((f != 0).sum()) == min(n * k, positives)
    if case in ("gaussian", "heavy_tail"):
        idx = _candidates(pre.reshape(-1), n * k, d_sae)
        assert idx is not None and n * k <= idx.numel() < pre.numel() // 2  # really narrowed


@pytest.mark.parametrize("pattern", ["sample_all_zero", "sample_overestimates", "too_few_positive"])
def test_batchtopk_candidates_survive_an_unrepresentative_sample(pattern):
    """Adversarial layouts for the every-17th-value sample: the candidates still hold the top n_keep."""
    from sae_mlops.sources.legacy_batchtopk import _candidates

    n, d_sae = 64, 128
    flat = torch.zeros(n * d_sae)
    sampled = torch.zeros(n * d_sae, dtype=torch.bool)
    sampled[::17] = True
    g = torch.Generator().manual_seed(0)
    if pattern == "sample_all_zero":
        flat[~sampled] = torch.rand(int((~sampled).sum()), generator=g) + 0.1
    elif pattern == "sample_overestimates":
        flat[sampled] = 10 + torch.rand(int(sampled.sum()), generator=g)
        flat[~sampled] = 5 + torch.rand(int((~sampled).sum()), generator=g)
    else:
        flat[:100] = torch.rand(100, generator=g) + 1
    n_keep = n * 8
    idx = _candidates(flat, n_keep, d_sae)
    top = set(torch.topk(flat, n_keep).indices.tolist())
    if pattern == "too_few_positive":
        assert idx is None
    else:
        assert idx is not None and top <= set(idx.tolist())
        sae = LegacyBatchTopKSAE(torch.eye(d_sae), torch.zeros(d_sae), torch.eye(d_sae), torch.zeros(d_sae), 8)
        f = sae._batch_topk(flat.view(n, d_sae)).reshape(-1)
        assert set(f.nonzero().squeeze(1).tolist()) == top


def test_batchtopk_code_depends_on_batch_and_ignores_b_enc(make_legacy_sae):
    path = make_legacy_sae(top_k=2, weights={"b_enc": torch.full((16,), 100.0)})
    sae = load_sae(str(path)).module
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    alone = sae.encode(x[:1])
    assert int((alone != 0).sum()) == 2
    w = weights_np(path)
    pre = relu((x[:1].double().numpy() - w["b_dec"]) @ w["W_enc"])
    np.testing.assert_allclose(alone.double().numpy(), batch_rule_np(pre, 2), rtol=1e-5, atol=1e-6)


def test_batchtopk_threshold_mode(make_legacy_sae):
    path = make_legacy_sae(top_k=3)
    loaded = load_sae(str(path), topk_mode="threshold", threshold=0.4)
    sae = loaded.module
    assert (sae.mode, sae.threshold) == ("threshold", 0.4)
    assert (loaded.info.topk_mode, loaded.info.threshold) == ("threshold", 0.4)
    w = weights_np(path)
    x = np.random.default_rng(4).normal(size=(7, 8))
    pre = relu((x - w["b_dec"]) @ w["W_enc"])
    f = sae.encode(torch.tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(f, pre * (pre > 0.4), rtol=1e-5, atol=1e-6)
    assert 0 < (f > 0).sum() < (pre > 0).sum()


def test_threshold_mode_without_threshold_raises_on_encode(make_legacy_sae):
    sae = load_sae(str(make_legacy_sae(top_k=3)), topk_mode="threshold").module
    assert sae.threshold is None
    with pytest.raises(RuntimeError, match="no threshold"):
        sae.encode(torch.randn(2, 8))


def test_unknown_topk_mode(make_legacy_sae):
    path = make_legacy_sae(top_k=3)
    with pytest.raises(InputError, match="topk_mode 'global'.*" + str(path)):
        load_sae(str(path), topk_mode="global")


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("no_config", "has no config.json"),
        ("no_weights", "has no weights.pt"),
        ("corrupt_config", "config.json is not valid JSON"),
        ("unsafe_weights", "weights_only=True"),
        ("garbage_weights", "weights_only=True"),
        ("missing_key", "lacks b_dec"),
        ("wrong_shape", "W_enc has shape (8, 15), expected (8, 16)"),
    ],
)
def test_bad_legacy_dirs(make_legacy_sae, case, fragment):
    path = make_legacy_sae(name=f"bad_{case}")
    if case == "no_config":
        (path / "config.json").unlink()
    elif case == "no_weights":
        (path / "weights.pt").unlink()
    elif case == "corrupt_config":
        (path / "config.json").write_text("{not json")
    elif case == "unsafe_weights":
        torch.save({"W_enc": NotATensor()}, path / "weights.pt")
    elif case == "garbage_weights":
        (path / "weights.pt").write_bytes(b"\x00garbage" * 10)
    elif case == "missing_key":
        state = torch.load(path / "weights.pt", weights_only=True)
        del state["b_dec"]
        torch.save(state, path / "weights.pt")
    elif case == "wrong_shape":
        state = torch.load(path / "weights.pt", weights_only=True)
        state["W_enc"] = state["W_enc"][:, :15]
        torch.save(state, path / "weights.pt")
    with pytest.raises(InputError) as info:
        load_sae(str(path))
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_config_without_dims(make_legacy_sae):
    path = make_legacy_sae()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["d_sae"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="no 'd_sae'"):
        load_sae(str(path))


def test_unreadable_history_is_ignored(make_legacy_sae):
    path = make_legacy_sae()
    (path / "history.json").write_text("[1, 2")
    assert load_sae(str(path)).info.history is None
    shutil.rmtree(path)
