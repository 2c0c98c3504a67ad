"""Demo language model: a 2-layer HookedTransformer trained on the demo corpus, saved as safetensors."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

N_CTX = 128
SEED = 0


def model_config_dict(d_vocab: int) -> dict[str, Any]:
    """HookedTransformerConfig arguments of the demo model (what `config.json` stores)."""
    return {
        "model_name": "demo",
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "d_head": 16,
        "d_mlp": 256,
        "n_ctx": N_CTX,
        "d_vocab": d_vocab,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "default_prepend_bos": True,
        "seed": SEED,
    }


def build_model(config: dict[str, Any], tokenizer: Any):  # -> HookedTransformer
    """A fresh HookedTransformer from `config` with `tokenizer` (TransformerLens' deprecation warning muted)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(HookedTransformerConfig(**config), tokenizer=tokenizer)
    model.cfg.default_prepend_bos = True
    return model


def make_windows(token_docs: Sequence[Sequence[int]], bos_id: int, n_ctx: int = N_CTX) -> torch.Tensor:
    """Pack documents into windows [n_windows, n_ctx] that each start with BOS.

    Documents are joined with the BOS/EOS token between them and the stream is cut into pieces of
    n_ctx - 1 tokens, each prefixed with BOS (as SAELens packs its training contexts). The last
    partial piece is dropped.
    """
    stream: list[int] = []
    for doc in token_docs:
        if stream:
            stream.append(bos_id)
        stream.extend(doc)
    step = n_ctx - 1
    n_windows = len(stream) // step
    body = torch.tensor(stream[: n_windows * step], dtype=torch.long).view(n_windows, step)
    return torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), body], dim=1)


def split_windows(windows: torch.Tensor, n_val: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministically shuffle windows and split them into (train, held-out) parts."""
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[perm[n_val:]], windows[perm[:n_val]]


def unigram_entropy(windows: torch.Tensor, d_vocab: int) -> float:
    """Entropy (nats) of the empirical distribution of the predicted tokens (positions 1..n_ctx-1):
    the loss of the best context-free predictor on these windows."""
    counts = torch.bincount(windows[:, 1:].reshape(-1), minlength=d_vocab).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def mean_loss(model: Any, windows: torch.Tensor, batch_size: int = 64, fwd_hooks: list | None = None) -> float:
    """Mean next-token cross-entropy (nats per prediction) of `model` over `windows`."""
    total, n = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        loss = model.run_with_hooks(batch, return_type="loss", fwd_hooks=fwd_hooks or [])
        count = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * count
        n += count
    return total / n


def zero_ablation_hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
    """Forward hook replacing the activation by zeros at every position."""
    return torch.zeros_like(activation)


def train_model(
    model: Any,
    train: torch.Tensor,
    *,
    epochs: int = 7,
    batch_size: int = 16,
    lr: float = 1e-2,
    weight_decay: float = 0.01,
    seed: int = SEED,
) -> list[float]:
    """Train `model` in place with AdamW (linear warm-up, cosine decay) on `train` windows.

    Returns the mean training loss of each epoch.
    """
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = len(train) // batch_size
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            batch = train[perm[i * batch_size : (i + 1) * batch_size]]
            loss = model(batch, return_type="loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item()
        epoch_losses.append(running / steps_per_epoch)
        logger.info(
            "model epoch %d/%d: train loss %.3f (%.0fs)", epoch + 1, epochs, epoch_losses[-1], time.perf_counter() - t0
        )
    model.eval()
    return epoch_losses


def save_model(model: Any, config: dict[str, Any], model_dir: Path) -> None:
    """Write `config.json` (HookedTransformerConfig arguments) and `model.safetensors` to `model_dir`."""
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def load_model(model_dir: Path, tokenizer: Any, device: str = "cpu"):  # -> HookedTransformer
    """Rebuild the model saved by `save_model` (offline) and put it in eval mode on `device`."""
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model = build_model(config, tokenizer)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model.to(device, print_details=False).eval()
