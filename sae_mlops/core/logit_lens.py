"""Logit lens per feature: the tokens a feature's decoder direction promotes and suppresses.

``L = W_dec @ W_U`` ([d_sae, d_vocab], no final layer norm): for each feature the ``n`` tokens
with the largest entries (top) and the smallest (bottom). Residual-width SAEs use ``W_dec``
directly; ``hook_z`` SAEs (all heads) go through ``W_O`` first. Other hooks have no direct
path to the unembedding and get no logit lens. Computed in feature blocks (memory ~ block x d_vocab).
"""

from __future__ import annotations

import numpy as np
import torch


def decoder_in_residual(w_dec: torch.Tensor, model, hook_name: str, head_index: int | None) -> torch.Tensor | None:
    """W_dec mapped into the residual stream [d_sae, d_model], or None when there is no linear path."""
    cfg = model.cfg
    w = w_dec.detach().float().cpu()
    if hook_name.endswith("hook_z") and head_index is None and w.shape[1] == cfg.n_heads * cfg.d_head:
        layer = int(hook_name.split(".")[1])
        w_o = model.blocks[layer].attn.W_O.detach().float().cpu()  # [H, Dh, d_model]
        return torch.einsum("fhd,hdm->fm", w.view(w.shape[0], cfg.n_heads, cfg.d_head), w_o)
    residual_like = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
    if w.shape[1] == cfg.d_model and any(hook_name.endswith(h) for h in residual_like):
        return w
    return None


def logit_lens(w_res: torch.Tensor, w_u: torch.Tensor, n: int = 10) -> dict[str, np.ndarray]:
    """Top/bottom ``n`` token ids and their logit values per feature."""
    w_u = w_u.detach().float().cpu()
    vocab = w_u.shape[1]
    n = min(n, vocab)
    block = max(1, (1 << 25) // vocab)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for start in range(0, w_res.shape[0], block):
        logits = w_res[start : start + block] @ w_u
        top = torch.topk(logits, n, dim=1)
        bottom = torch.topk(logits, n, dim=1, largest=False)
        out["top_ids"].append(top.indices)
        out["top_values"].append(top.values)
        out["bottom_ids"].append(bottom.indices)
        out["bottom_values"].append(bottom.values)
    return {k: torch.cat(v).numpy() for k, v in out.items()}
