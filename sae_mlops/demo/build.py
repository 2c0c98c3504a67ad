"""Rebuild the embedded demo assets from scratch, offline and deterministically (fixed seeds).

Steps: stdlib docstring corpus -> byte-level BPE tokenizer -> 2-layer HookedTransformer trained on
BOS-led windows of the corpus -> activations of `blocks.0.hook_resid_post` on the non-special tokens
-> three SAEs (prior-format standard and BatchTopK, SAELens TopK) -> statistics on held-out windows.
Everything is written to a temporary sibling directory and moved into place at the end, so an
interrupted build leaves the previous assets intact.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from sae_mlops.demo import lm
from sae_mlops.demo.assets import (
    ASSETS_DIR,
    HOOK_NAME,
    demo_corpus_path,
    demo_model_dir,
    demo_sae_path,
    demo_tokenizer_dir,
)
from sae_mlops.demo.corpus import build_corpus, save_corpus
from sae_mlops.demo.legacy_sae import LegacySAEConfig, save_legacy_sae, train_legacy_sae
from sae_mlops.demo.saelens_sae import train_saelens_topk
from sae_mlops.demo.tokenizer import load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

N_HELDOUT_WINDOWS = 128
MODEL_EPOCHS = 7
D_SAE = 512  # 8 * d_model
TOP_K = 16
STANDARD_L1 = 0.02  # in scaled units (mean ||x||^2 = d_in), see legacy_sae
SAE_EPOCHS = 5

EncodeDecode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def demo_windows(tokenizer: Any, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) windows [n, n_ctx] of the corpus, each starting with BOS, as the build used them."""
    windows = lm.make_windows(tokenizer(docs)["input_ids"], tokenizer.bos_token_id)
    return lm.split_windows(windows, N_HELDOUT_WINDOWS)


def special_mask(windows: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True at the positions holding a non-special token."""
    return ~torch.isin(windows, torch.tensor(special_ids))


@torch.no_grad()
def hook_activations(model: Any, windows: torch.Tensor, special_ids: list[int], batch_size: int = 64) -> torch.Tensor:
    """Activations of `HOOK_NAME` at the non-special positions of `windows`: [n_tokens, d_model]."""
    out = []
    for batch in windows.split(batch_size):
        _, cache = model.run_with_cache(batch, names_filter=HOOK_NAME, stop_at_layer=1)
        out.append(cache[HOOK_NAME][special_mask(batch, special_ids)])
    return torch.cat(out)


@torch.no_grad()
def heldout_sae_stats(
    model: Any, encode_decode: EncodeDecode, windows: torch.Tensor, special_ids: list[int], batch_size: int = 16
) -> dict[str, float]:
    """L0, explained variance (per dimension about the mean) and CE losses of an SAE spliced into
    `HOOK_NAME` at the non-special positions of `windows`, over predictions made from those positions.

    `encode_decode(x)` returns (f, x_hat) for the analysed tokens of one batch (a BatchTopK batch).
    loss_recovered = (CE zero - CE sae) / (CE zero - CE clean); CE zero zeroes every position.
    """
    sq_err = sum_sq = l0 = 0.0
    sum_x = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    n_tok = 0
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_pred = 0
    for batch in windows.split(batch_size):
        mask = special_mask(batch, special_ids)

        def splice(act: torch.Tensor, hook: Any, mask: torch.Tensor = mask) -> torch.Tensor:
            nonlocal sq_err, sum_sq, l0, sum_x, n_tok
            x = act[mask]
            f, x_hat = encode_decode(x)
            sq_err += float((x - x_hat).double().pow(2).sum())
            sum_sq += float(x.double().pow(2).sum())
            sum_x += x.double().sum(0)
            l0 += float((f != 0).sum())
            n_tok += len(x)
            act = act.clone()
            act[mask] = x_hat
            return act

        pred_mask = mask[:, :-1]
        hooks = {"clean": [], "sae": [(HOOK_NAME, splice)], "zero": [(HOOK_NAME, lm.zero_ablation_hook)]}
        for name, fwd_hooks in hooks.items():
            loss = model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=fwd_hooks)
            ce[name] += float(loss[pred_mask].double().sum())
        n_pred += int(pred_mask.sum())
    variance = sum_sq / n_tok - float(sum_x.div(n_tok).pow(2).sum())
    ce = {k: v / n_pred for k, v in ce.items()}
    return {
        "l0": l0 / n_tok,
        "explained_variance": 1.0 - (sq_err / n_tok) / variance,
        "mse_per_token": sq_err / n_tok,
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "n_tokens": n_tok,
    }


def _encode_decode(sae: Any) -> EncodeDecode:
    """`encode_decode` for any SAE with `encode` and `decode` (ours or SAELens's)."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = sae.encode(x)
        return f, sae.decode(f)

    return run


def _legacy_config(top_k: int | None, l1: float, d_in: int) -> LegacySAEConfig:
    return LegacySAEConfig(
        d_in=d_in, d_sae=D_SAE, l1_coefficient=l1, top_k=top_k, top_k_aux=D_SAE // 4,
        n_batches_to_dead=5, aux_penalty=1 / 32, context_size=lm.N_CTX,
    )


def _versions() -> dict[str, str]:
    """Versions that determine the build's bytes."""
    packages = ("torch", "transformer-lens", "sae-lens", "tokenizers", "transformers")
    return {"python": platform.python_version(), **{name: version(name) for name in packages}}


def _build_into(out: Path) -> dict[str, Any]:
    """Build every asset into the empty directory `out`; return the build's statistics."""
    seed = lm.SEED
    docs = build_corpus()
    save_corpus(docs, demo_corpus_path(out))

    train_tokenizer(docs, demo_tokenizer_dir(out))
    tokenizer = load_tokenizer(demo_tokenizer_dir(out))
    special_ids = list(tokenizer.all_special_ids)
    train, heldout = demo_windows(tokenizer, docs)

    config = lm.model_config_dict(len(tokenizer))
    torch.manual_seed(seed)
    model = lm.build_model(config, tokenizer)
    epoch_losses = lm.train_model(model, train, epochs=MODEL_EPOCHS, seed=seed)
    lm.save_model(model, config, demo_model_dir(out))
    model_stats = {
        "config": config,
        "train_windows": len(train),
        "heldout_windows": len(heldout),
        "epochs": MODEL_EPOCHS,
        "train_loss_per_epoch": epoch_losses,
        "unigram_entropy_train": lm.unigram_entropy(train, len(tokenizer)),
        "unigram_entropy_heldout": lm.unigram_entropy(heldout, len(tokenizer)),
        "heldout_loss": lm.mean_loss(model, heldout),
        "heldout_zero_ablation_loss": lm.mean_loss(model, heldout, fwd_hooks=[(HOOK_NAME, lm.zero_ablation_hook)]),
    }
    logger.info(
        "model: unigram entropy %.3f, held-out loss %.3f, with %s zeroed %.3f",
        model_stats["unigram_entropy_train"], model_stats["heldout_loss"], HOOK_NAME,
        model_stats["heldout_zero_ablation_loss"],
    )

    train_acts = hook_activations(model, train, special_ids)
    val_acts = hook_activations(model, heldout, special_ids)
    logger.info("SAE training activations: %s", tuple(train_acts.shape))
    sae_stats: dict[str, dict[str, float]] = {}
    for kind, top_k, l1 in (("standard", None, STANDARD_L1), ("batchtopk", TOP_K, 0.0)):
        t0 = time.perf_counter()
        sae, history = train_legacy_sae(
            _legacy_config(top_k, l1, train_acts.shape[1]), train_acts, val_acts, epochs=SAE_EPOCHS, lr=3e-3, seed=seed
        )
        save_legacy_sae(sae, history, demo_sae_path(kind, out))
        sae_stats[kind] = heldout_sae_stats(model, _encode_decode(sae), heldout, special_ids)
        logger.info("SAE %s trained in %.0fs: %s", kind, time.perf_counter() - t0, sae_stats[kind])

    t0 = time.perf_counter()
    train_saelens_topk(
        train_acts, demo_sae_path("saelens", out), hook_name=HOOK_NAME, model_name="demo",
        context_size=lm.N_CTX, d_sae=D_SAE, k=TOP_K, epochs=SAE_EPOCHS, seed=seed,
    )
    from sae_lens import SAE

    saelens_sae = SAE.load_from_disk(str(demo_sae_path("saelens", out)))
    sae_stats["saelens"] = heldout_sae_stats(model, _encode_decode(saelens_sae), heldout, special_ids)
    logger.info("SAE saelens trained in %.0fs: %s", time.perf_counter() - t0, sae_stats["saelens"])

    return {
        "seed": seed,
        "hook_name": HOOK_NAME,
        "corpus": {"documents": len(docs), "chars": sum(map(len, docs))},
        "tokenizer": {"vocab_size": len(tokenizer), "special_token": tokenizer.bos_token},
        "model": model_stats,
        "saes": sae_stats,
        "versions": _versions(),
    }


def build_demo_assets(out_dir: Path = ASSETS_DIR, threads: int | None = None) -> dict[str, Any]:
    """Rebuild all demo assets into `out_dir` (other files there, e.g. README.md, are kept) and
    return the statistics also written to `out_dir/build_info.json`.

    Torch runs with deterministic algorithms and `threads` threads (default min(4, cores)); the
    bytes are reproducible for the same package versions and thread count. Both settings are
    restored afterwards.
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads or min(4, os.cpu_count() or 1))
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=out_dir.parent))
    try:
        info = _build_into(tmp)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for item in sorted(tmp.iterdir()):
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])
    logger.info("demo assets rebuilt in %s in %.0fs", out_dir, time.perf_counter() - t0)
    return info
