"""The engine's chunked CE/KL equal an independent computation from full-model logits.

The engine continues each variant only to the residual stream after the last block and unembeds
the analysed rows in small chunks; here every variant runs as a plain hooked forward pass to the
logits and CE/KL are computed in float64 over the whole vocabulary, per position.
"""

from __future__ import annotations

import pytest
import torch

from core_fixtures import random_standard_sae, tiny_model
from sae_mlops.core.engine import Engine, HookSite
from sae_mlops.core.tokens import Window, WindowPlan, collate


def _model(variant: str):
    model, tokenizer = tiny_model()
    if variant == "ln":
        return model, tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = model.cfg.to_dict()
    cfg.pop("n_params", None)
    if variant == "rms_softcap":
        cfg.update(normalization_type="RMS", output_logits_soft_cap=3.0)
    elif variant == "rotary":
        cfg.update(positional_embedding_type="rotary", rotary_dim=cfg["d_head"])
    else:  # no final norm
        cfg.update(normalization_type=None)
    torch.manual_seed(1)
    other = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tokenizer)
    with torch.no_grad():
        for p in other.parameters():  # random, not all-equal (e.g. b_U), weights
            p.add_(torch.randn_like(p) * 0.2)
    other.eval()
    return other, tokenizer


def _batch(tokenizer, plan: WindowPlan, seed: int = 0, lengths=(20, 31, 7, 31)):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    windows = [
        Window(i, 0, [plan.bos_id, *torch.randint(1, vocab, (length,), generator=g).tolist()], True)
        for i, length in enumerate(lengths)
    ]
    return collate(windows, plan)


def _reference(model, site: HookSite, sae, batch):
    """CE at predicts and KL at analysed rows from full hooked forwards (float64)."""
    tokens, analysed = batch.tokens, batch.analysed
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=[site.name], padding_side="right")
        act = cache[site.name]
        x_hat = sae.decode(sae.encode(act[analysed]))
        spliced = act.clone()
        spliced[analysed] = x_hat

        def run(value):
            return model.run_with_hooks(tokens, fwd_hooks=[(site.name, lambda a, hook: value)], padding_side="right")

        logits = {"clean": clean, "sae": run(spliced), "zero": run(torch.zeros_like(act))}
    lp = {k: torch.log_softmax(v.double(), -1)[analysed] for k, v in logits.items()}
    nxt = torch.nn.functional.pad(tokens[:, 1:], (0, 1))[analysed][:, None]
    predicts = torch.nn.functional.pad(batch.predicts, (0, 1))[analysed]
    ce = {k: -v.gather(-1, nxt)[:, 0][predicts] for k, v in lp.items()}
    p = lp["clean"].exp()
    kl = {k: (p * (lp["clean"] - lp[k])).sum(-1) for k in ("sae", "zero")}
    return ce, kl


def _check(step, model, site, sae, batch):
    ce, kl = _reference(model, site, sae, batch)
    for name in ("clean", "sae", "zero"):
        torch.testing.assert_close(getattr(step, f"ce_{name}").double(), ce[name], rtol=1e-4, atol=1e-4)
    for name in ("sae", "zero"):
        torch.testing.assert_close(getattr(step, f"kl_{name}").double(), kl[name], rtol=1e-3, atol=1e-4)


_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "ln_final.hook_normalized"]


@pytest.mark.parametrize(
    "variant, hook",
    [(v, h) for v in ("ln", "rms_softcap", "no_final_norm", "rotary") for h in _HOOKS
     if not (v == "no_final_norm" and h.startswith("ln_final"))],  # no ln_final without a final norm
)
def test_chunked_ce_and_kl_equal_full_logits(variant, hook):
    model, tokenizer = _model(variant)
    plan = WindowPlan(32, True, tokenizer.bos_token_id, tokenizer.pad_token_id, [tokenizer.bos_token_id])
    batch = _batch(tokenizer, plan)
    sae = random_standard_sae(model.cfg.d_model, 64, hook)
    site = HookSite.for_model(model, hook)
    assert (site.resume_layer is not None) == ("resid" in hook)
    engine = Engine(model, sae, site, "cpu")
    engine.vocab_chunk_elements = 7 * int(model.cfg.d_vocab_out)  # 7-row chunks, a partial last one
    assert batch.n_analysed % 7 != 0
    for seed, lengths in ((0, (20, 31, 7, 31)), (1, (31, 3, 12))):  # the 2nd batch uses the cached zero row
        batch = _batch(tokenizer, plan, seed, lengths)
        _check(engine.step(batch), model, site, sae, batch)
    # the zero-ablated continuation is one row for every position on the residual fast path
    assert (engine._zero_row is not None and engine._zero_row is not False) == (site.resume_layer is not None)


def test_position_dependent_continuation_falls_back_to_the_full_zero_ablation(caplog):
    """A model that injects positions after the hook: the one-row shortcut must not be used."""
    model, tokenizer = _model("ln")

    def add_position(resid, hook):  # noqa: ARG001
        return resid + torch.arange(resid.shape[1], dtype=resid.dtype)[None, :, None] * 0.5

    model.add_hook("blocks.1.hook_resid_mid", add_position)
    try:
        plan = WindowPlan(32, True, tokenizer.bos_token_id, tokenizer.pad_token_id, [tokenizer.bos_token_id])
        hook = "blocks.0.hook_resid_post"
        sae = random_standard_sae(model.cfg.d_model, 64, hook)
        site = HookSite.for_model(model, hook)
        engine = Engine(model, sae, site, "cpu")
        for seed in (0, 1):
            batch = _batch(tokenizer, plan, seed)
            _check(engine.step(batch), model, site, sae, batch)
        assert engine._zero_row is False
        assert "differs between positions" in caplog.text
    finally:
        model.reset_hooks(including_permanent=True)
