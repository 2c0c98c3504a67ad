"""The committed demo assets: present, small, loadable offline, and doing what the demo needs."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from sae_mlops.demo import (
    ASSETS_DIR,
    HOOK_NAME,
    demo_corpus_path,
    demo_sae_path,
    demo_tokenizer_dir,
    ensure_demo_assets,
    load_demo_model,
)
from sae_mlops.demo.assets import required_files
from sae_mlops.demo.build import demo_windows, hook_activations
from sae_mlops.demo.lm import make_windows, zero_ablation_hook
from sae_mlops.errors import InputError

LEGACY_KEYS = {
    "d_in", "d_sae", "l1_coefficient", "dtype", "device", "hook_layer", "hook_name", "hook_spec", "top_k",
    "top_k_aux", "n_batches_to_dead", "aux_penalty", "model_name", "context_size", "prepend_bos",
}
HISTORY_BASE = {
    "loss", "recon_loss", "l1_loss", "sparsity", "aux_loss", "recon_contribution", "l1_contribution",
    "dead_features", "dead_feature_percentage",
}
SPECIAL = "<|endoftext|>"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return json.loads(demo_corpus_path().read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_demo_model("cpu")


@pytest.fixture(scope="module")
def heldout(model_and_tokenizer, docs) -> torch.Tensor:
    """16 held-out windows (not trained on) of the demo corpus."""
    return demo_windows(model_and_tokenizer[1], docs)[1][:16]


@pytest.fixture(scope="module")
def heldout_acts(model_and_tokenizer, heldout) -> torch.Tensor:
    model, tokenizer = model_and_tokenizer
    return hook_activations(model, heldout, list(tokenizer.all_special_ids))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return 1.0 - float((x - x_hat).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean())


def test_assets_present_and_small(docs: list[str]) -> None:
    assert ensure_demo_assets() == ASSETS_DIR
    missing = [p for p in required_files() if not p.is_file()]
    assert not missing
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert total < 8_000_000
    assert 1000 < len(docs) and all(isinstance(d, str) and len(d) >= 40 and d == d.strip() for d in docs)
    assert len(set(docs)) == len(docs)
    assert 1_000_000 < sum(map(len, docs)) < 2_600_000


def test_tokenizer_offline_roundtrip(docs: list[str]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (SPECIAL,) * 4
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    special_map = json.loads((demo_tokenizer_dir() / "special_tokens_map.json").read_text())
    assert {special_map[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")} == {SPECIAL}
    for text in [docs[0], docs[-1], "Return the café's 日本 ∑ value.\n\tIndented  twice."]:
        ids = tok(text)["input_ids"]
        assert 0 not in ids  # no special token added
        assert tok.decode(ids) == text
    assert len(tok) == 2048


def test_model_config_and_bos(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    assert model.cfg.default_prepend_bos is True
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_ctx, model.cfg.d_vocab) == (2, 64, 128, len(tokenizer))
    tokens = model.to_tokens("def f(x): return x")
    assert tokens[0, 0].item() == tokenizer.bos_token_id and tokens[0, 1].item() != tokenizer.bos_token_id


def test_windows_start_with_bos() -> None:
    windows = make_windows([[5, 6, 7], [8, 9, 10, 11, 12]], bos_id=0, n_ctx=4)
    assert windows.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9], [0, 10, 11, 12]]


def test_model_beats_unigram_and_needs_layer0(model_and_tokenizer, docs, heldout) -> None:
    model, tokenizer = model_and_tokenizer
    counts = Counter(t for ids in tokenizer(docs)["input_ids"] for t in ids)
    n = sum(counts.values())
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())
    with torch.no_grad():
        clean = float(model(heldout, return_type="loss"))
        zeroed = float(model.run_with_hooks(heldout, return_type="loss", fwd_hooks=[(HOOK_NAME, zero_ablation_hook)]))
    assert 5.5 < unigram < 7.5
    assert clean < unigram - 1.5
    assert zeroed > clean + 2.0


@pytest.mark.parametrize("kind", ["standard", "batchtopk"])
def test_legacy_sae(kind: str, heldout_acts: torch.Tensor) -> None:
    path = demo_sae_path(kind)
    cfg = json.loads((path / "config.json").read_text())
    assert set(cfg) == LEGACY_KEYS
    assert (cfg["hook_layer"], cfg["hook_name"], cfg["hook_spec"]) == ("0", "hook_resid_post", HOOK_NAME)
    assert (cfg["model_name"], cfg["context_size"], cfg["prepend_bos"], cfg["dtype"]) == ("demo", 128, True, "float32")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    w = torch.load(path / "weights.pt", weights_only=True)
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "ever_fired": (d_sae,)}
    if kind == "batchtopk":
        expected["num_batches_not_active"] = (d_sae,)
    assert {k: tuple(v.shape) for k, v in w.items()} == expected
    assert w["ever_fired"].dtype == torch.bool and w["W_enc"].dtype == torch.float32

    history = json.loads((path / "history.json").read_text())
    assert set(history) == HISTORY_BASE | {f"val_{k}" for k in HISTORY_BASE}
    assert len({len(v) for v in history.values()}) == 1 and len(history["loss"]) >= 3

    # The math of the prior format (seed notes), written out independently of LegacySAE.
    x = heldout_acts
    if kind == "standard":
        assert cfg["top_k"] is None
        f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    else:
        assert cfg["top_k"] == 16 and not w["b_enc"].any()
        pre = torch.relu((x - w["b_dec"]) @ w["W_enc"])
        threshold = pre.flatten().topk(len(x) * cfg["top_k"]).values[-1]
        f = torch.where(pre >= threshold, pre, torch.zeros_like(pre))
        assert any(v > 0 for v in history["aux_loss"])
    x_hat = f @ w["W_dec"] + w["b_dec"]
    l0 = float((f != 0).sum(-1).float().mean())
    assert explained_variance(x, x_hat) > 0.7
    assert 1 < l0 < d_sae / 8


def test_saelens_sae(heldout_acts: torch.Tensor) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(demo_sae_path("saelens")))
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.model_name, meta.context_size, meta.prepend_bos) == (HOOK_NAME, "demo", 128, True)
    assert sae.cfg.d_in == heldout_acts.shape[1]
    with torch.no_grad():
        f = sae.encode(heldout_acts)
        x_hat = sae.decode(f)
    assert explained_variance(heldout_acts, x_hat) > 0.7
    assert float((f != 0).sum(-1).float().mean()) < sae.cfg.d_sae / 8


def test_unknown_sae_kind() -> None:
    with pytest.raises(InputError, match="standard"):
        demo_sae_path("gated")


def test_ensure_rebuilds_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sae_mlops.demo.build as build

    calls: list[Path] = []
    monkeypatch.setattr(build, "build_demo_assets", lambda out_dir: calls.append(out_dir))
    assert ensure_demo_assets() == ASSETS_DIR and calls == []
    assert ensure_demo_assets(assets_dir=tmp_path) == tmp_path and calls == [tmp_path]
