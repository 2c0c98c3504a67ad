"""SAELens directories and releases, and how `load_sae` classifies what the user typed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_mlops.errors import InputError
from sae_mlops.sources.sae import classify_sae_source, load_sae


def state_np(path):
    return {k: v.double().numpy() for k, v in load_file(str(path / "sae_weights.safetensors")).items()}


def expected_encode(arch: str, x: np.ndarray, w: dict, k: int = 3) -> np.ndarray:
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.maximum(pre, 0) * (pre > w["threshold"])
    out = np.zeros_like(pre)  # topk: per token, the k largest pre-activations, then relu
    top = np.argsort(-pre, axis=1)[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    out[rows, top] = np.maximum(pre[rows, top], 0)
    return out


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_dir_math_and_info(make_saelens_sae, arch):
    kwargs = {"k": 3} if arch == "topk" else {}
    path = make_saelens_sae(arch, **kwargs)
    loaded = load_sae(str(path))
    info = loaded.info
    assert (info.format, info.architecture) == ("saelens", arch)
    assert (info.hook_name, info.hook_layer, info.d_in, info.d_sae) == ("blocks.0.hook_resid_post", 0, 8, 16)
    assert (info.model_name, info.prepend_bos, info.context_size) == ("demo", True, 32)
    assert info.local_path == path.resolve() and len(info.content_hash) == 64
    w = state_np(path)
    x = np.random.default_rng(0).normal(size=(5, 8))
    f = loaded.module.encode(torch.tensor(x, dtype=torch.float32)).double().numpy()
    expected = expected_encode(arch, x, w)
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-5)
    assert 0 < (expected > 0).sum() < expected.size
    x_hat = loaded.module.decode(torch.tensor(f, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(x_hat, f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def test_hook_z_sae_takes_flattened_rows(make_saelens_sae):
    path = make_saelens_sae("standard", hook_name="blocks.1.attn.hook_z", reshape_activations="hook_z")
    loaded = load_sae(str(path))
    assert loaded.info.extra["hook_z"] is True and loaded.info.hook_layer == 1
    out = loaded.module.encode(torch.randn(5, 8))
    assert out.shape == (5, 16)
    assert loaded.module.decode(out).shape == (5, 8)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("no_weights", "has no sae_weights.safetensors"),
        ("corrupt_cfg", "cfg.json is not valid JSON"),
        ("unknown_arch", "architecture 'wavelet' is not known"),
        ("wrong_dims", "could not be loaded by SAELens"),
    ],
)
def test_bad_saelens_dirs(make_saelens_sae, case, fragment):
    path = make_saelens_sae("standard", name=f"bad_{case}")
    cfg_path = path / "cfg.json"
    if case == "no_weights":
        (path / "sae_weights.safetensors").unlink()
    elif case == "corrupt_cfg":
        cfg_path.write_text("{")
    else:
        cfg = json.loads(cfg_path.read_text())
        if case == "unknown_arch":
            cfg["architecture"] = "wavelet"
        else:
            cfg["d_sae"] = 20
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError) as info:
        load_sae(str(path))
    assert str(path) in str(info.value) and fragment in str(info.value)


# -- releases ---------------------------------------------------------------------------------

RELEASE, SAE_ID = "gpt2-small-res-jb", "blocks.8.hook_resid_pre"


@pytest.fixture
def hub_offline(monkeypatch):
    """Force huggingface_hub offline (the test must not depend on whether this machine has network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("form", ["colon", "separate"])
def test_release_offline_is_a_clear_input_error(hub_offline, form):
    source, sae_id = (f"{RELEASE}:{SAE_ID}", None) if form == "colon" else (RELEASE, SAE_ID)
    with pytest.raises(InputError) as info:
        load_sae(source, sae_id=sae_id)
    message = str(info.value)
    assert RELEASE in message and SAE_ID in message
    assert "could not be downloaded" in message and "local SAELens directory" in message


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    """The product code itself (not an env var) avoids huggingface_hub's ~30 s of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(InputError, match="no network"):
        load_sae(f"{RELEASE}:{SAE_ID}")
    assert time.perf_counter() - start < 15
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_unknown_release():
    with pytest.raises(InputError, match="release 'gpt2-smol-res-jb' is not known.*did you mean gpt2-small-res-jb"):
        load_sae("gpt2-smol-res-jb:blocks.8.hook_resid_pre")


def test_unknown_sae_id_in_known_release():
    with pytest.raises(
        InputError, match="SAE id 'blocks.99.hook_resid_pre' is not in SAELens release gpt2-small-res-jb"
    ):
        load_sae(RELEASE, sae_id="blocks.99.hook_resid_pre")


# -- classification of the user's string ------------------------------------------------------


def test_classify_forms(tmp_path):
    assert classify_sae_source(str(tmp_path)).kind == "directory"
    assert classify_sae_source("runs:/abc/sae").kind == "mlflow"
    assert classify_sae_source("models:/m@prod").kind == "mlflow"
    spec = classify_sae_source("rel:layer_1/width_16k")
    assert (spec.kind, spec.value, spec.sae_id) == ("release", "rel", "layer_1/width_16k")
    spec = classify_sae_source("rel", sae_id="x")
    assert (spec.kind, spec.value, spec.sae_id) == ("release", "rel", "x")


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("s3://bucket/sae", "unsupported URI scheme 's3:'"),
        ("foo:/x", "unsupported URI scheme 'foo:'"),
        ("no_such_sae_dir", "SAE path no_such_sae_dir does not exist"),
        ("/no/such/run:3/sae", "SAE path /no/such/run:3/sae does not exist"),
        ("bad:", "neither a path nor release:sae_id"),
    ],
)
def test_classify_errors(source, fragment):
    with pytest.raises(InputError) as info:
        load_sae(source)
    assert fragment in str(info.value)
    assert "release:sae_id" in str(info.value)


def test_sae_id_with_local_directory_is_refused(make_saelens_sae):
    path = make_saelens_sae()
    with pytest.raises(InputError, match="--sae-id x does not apply"):
        load_sae(str(path), sae_id="x")


def test_directory_without_sae_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds neither SAE layout"):
        load_sae(str(tmp_path / "empty"))
