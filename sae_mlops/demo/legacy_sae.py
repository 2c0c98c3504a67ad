"""Demo SAEs in the prior tool's directory format (config.json, weights.pt, history.json).

Math (as the prior tool trained and analysed them):
- standard: f = relu((x - b_dec) @ W_enc + b_enc)
- BatchTopK (top_k set): pre = relu((x - b_dec) @ W_enc) (b_enc unused, stored as zeros); of all
  n_tokens * d_sae values of the batch keep the n_tokens * top_k largest, zero the rest.
- both: x_hat = f @ W_dec + b_dec. Decoder rows are kept at unit norm during training.

Training runs on activations scaled by s = sqrt(d_in / mean ||x||^2) (so one l1_coefficient suits any
model's activation scale); the scale is folded into b_enc and b_dec afterwards (f becomes f'/s), so
the saved SAE takes raw activations. `l1_coefficient` and `history.json` are in the scaled units.

Training loss = recon_loss + l1_coefficient * l1_loss + aux_loss, where recon_loss is the mean
squared error per element, l1_loss the mean over tokens of sum_i |f_i| and aux_loss (BatchTopK only)
the AuxK loss: aux_penalty * MSE of the residual x - x_hat reconstructed by the top_k_aux largest
pre-activations of the features not active for n_batches_to_dead batches.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HISTORY_KEYS = (
    "loss",
    "recon_loss",
    "l1_loss",
    "sparsity",
    "aux_loss",
    "recon_contribution",
    "l1_contribution",
    "dead_features",
    "dead_feature_percentage",
)


@dataclass
class LegacySAEConfig:
    """The prior tool's `config.json`, plus the demo's training metadata (model, context, BOS)."""

    d_in: int
    d_sae: int
    l1_coefficient: float
    top_k: int | None
    top_k_aux: int
    n_batches_to_dead: int
    aux_penalty: float
    hook_layer: str = "0"
    hook_name: str = "hook_resid_post"
    hook_spec: str = "blocks.0.hook_resid_post"
    dtype: str = "float32"
    device: str = "cpu"
    model_name: str = "demo"
    context_size: int = 128
    prepend_bos: bool = True


class LegacySAE(nn.Module):
    """Standard or BatchTopK SAE with the prior tool's parameter names and buffers."""

    ever_fired: torch.Tensor  # buffers (typed here: nn.Module's __getattr__ is untyped)
    num_batches_not_active: torch.Tensor

    def __init__(self, cfg: LegacySAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w_dec = torch.empty(cfg.d_sae, cfg.d_in)
        nn.init.kaiming_uniform_(w_dec)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=cfg.top_k is None)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("ever_fired", torch.zeros(cfg.d_sae, dtype=torch.bool))
        if cfg.top_k is not None:
            self.register_buffer("num_batches_not_active", torch.zeros(cfg.d_sae))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations after the ReLU (before the BatchTopK selection)."""
        pre = (x - self.b_dec) @ self.W_enc
        if self.cfg.top_k is None:
            pre = pre + self.b_enc
        return torch.relu(pre)

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """Standard: identity. BatchTopK: keep the n_tokens * top_k largest values of the batch."""
        if self.cfg.top_k is None:
            return pre
        flat = pre.flatten()
        keep = min(flat.numel(), pre.shape[0] * self.cfg.top_k)
        values, idx = flat.topk(keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, values).view_as(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations f [n_tokens, d_sae] of x [n_tokens, d_in]."""
        return self.select(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat [n_tokens, d_in]."""
        return f @ self.W_dec + self.b_dec

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Total loss, its logged parts, and the features f of the batch x."""
        pre = self.pre_acts(x)
        f = self.select(pre)
        x_hat = self.decode(f)
        recon = (x_hat - x).pow(2).mean()
        l1 = f.abs().sum(-1).mean()
        aux = self._aux_loss(x - x_hat.detach(), pre)
        loss = recon + self.cfg.l1_coefficient * l1 + aux
        total = loss.item()
        parts = {
            "loss": total,
            "recon_loss": recon.item(),
            "l1_loss": l1.item(),
            "sparsity": (f != 0).sum(-1).float().mean().item(),
            "aux_loss": aux.item(),
            "recon_contribution": recon.item() / total,
            "l1_contribution": self.cfg.l1_coefficient * l1.item() / total,
        }
        return loss, parts, f

    def _aux_loss(self, residual: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """AuxK loss on dead features (BatchTopK only; zero otherwise or when none are dead)."""
        if self.cfg.top_k is None:
            return pre.new_zeros(())
        dead = self.num_batches_not_active >= self.cfg.n_batches_to_dead
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        values, idx = pre[:, dead].topk(min(self.cfg.top_k_aux, n_dead), dim=-1)
        acts = torch.zeros_like(pre[:, dead]).scatter(-1, idx, values)
        return self.cfg.aux_penalty * (acts @ self.W_dec[dead] - residual).pow(2).mean()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Remove the part of W_dec's gradient that would change the rows' norms."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Turn an SAE trained on x * scale into one on x: f and x_hat both divide by `scale`."""
        self.b_dec.div_(scale)
        self.b_enc.div_(scale)

    @torch.no_grad()
    def update_firing(self, f: torch.Tensor) -> None:
        """Update `ever_fired` and (BatchTopK) `num_batches_not_active` after a training batch."""
        fired = (f != 0).any(0)
        self.ever_fired |= fired
        if self.cfg.top_k is not None:
            self.num_batches_not_active += 1
            self.num_batches_not_active[fired] = 0


def _batches(acts: torch.Tensor, batch_size: int, perm: torch.Tensor | None = None):
    """Row batches of `acts` (in `perm` order if given), dropping a last partial batch of a shuffled pass."""
    n = len(acts)
    stop = n - n % batch_size if perm is not None else n
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size] if perm is not None else slice(start, start + batch_size)
        yield acts[idx]


def _epoch_stats(sums: dict[str, float], n_batches: int, fired: torch.Tensor) -> dict[str, float]:
    stats = {k: v / n_batches for k, v in sums.items()}
    stats["dead_features"] = float((~fired).sum())
    stats["dead_feature_percentage"] = 100.0 * stats["dead_features"] / fired.numel()
    return stats


def train_legacy_sae(
    cfg: LegacySAEConfig,
    train_acts: torch.Tensor,
    val_acts: torch.Tensor,
    *,
    epochs: int = 5,
    batch_size: int = 2048,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[LegacySAE, dict[str, list[float]]]:
    """Train a prior-format SAE on activations [n, d_in]; returns it and its per-epoch history
    (`HISTORY_KEYS` on the training batches, `val_<key>` on `val_acts` after each epoch, both in
    scaled units, see the module docstring)."""
    scale = math.sqrt(cfg.d_in / float(train_acts.pow(2).sum(-1).mean()))
    train_acts, val_acts = train_acts * scale, val_acts * scale
    torch.manual_seed(seed)
    sae = LegacySAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(train_acts.median(dim=0).values)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
    history.update({f"val_{k}": [] for k in HISTORY_KEYS})
    for epoch in range(epochs):
        sums = dict.fromkeys(HISTORY_KEYS[:7], 0.0)
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        n_batches = 0
        for x in _batches(train_acts, batch_size, torch.randperm(len(train_acts), generator=gen)):
            loss, parts, f = sae.losses(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grad()
            opt.step()
            sae.normalize_decoder()
            sae.update_firing(f)
            fired |= (f != 0).any(0)
            for k, v in parts.items():
                sums[k] += v
            n_batches += 1
        for k, v in _epoch_stats(sums, n_batches, fired).items():
            history[k].append(v)
        for k, v in evaluate_legacy_sae(sae, val_acts, batch_size).items():
            history[f"val_{k}"].append(v)
        logger.info(
            "SAE (top_k=%s) epoch %d/%d: loss %.4f, L0 %.1f, val loss %.4f, dead %d",
            cfg.top_k, epoch + 1, epochs, history["loss"][-1], history["sparsity"][-1],
            history["val_loss"][-1], int(history["dead_features"][-1]),
        )
    sae.fold_input_scale(scale)
    return sae, history


@torch.no_grad()
def evaluate_legacy_sae(sae: LegacySAE, acts: torch.Tensor, batch_size: int = 2048) -> dict[str, float]:
    """The history metrics of `sae` on `acts` (no training; dead = not fired on `acts`)."""
    sums = dict.fromkeys(HISTORY_KEYS[:7], 0.0)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    n_batches = 0
    for x in _batches(acts, batch_size):
        _, parts, f = sae.losses(x)
        fired |= (f != 0).any(0)
        for k, v in parts.items():
            sums[k] += v
        n_batches += 1
    return _epoch_stats(sums, n_batches, fired)


def save_legacy_sae(sae: LegacySAE, history: dict[str, list[float]], out_dir: Path) -> None:
    """Write `config.json`, `weights.pt` (tensors only: loadable with weights_only=True) and `history.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(sae.cfg), indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
    torch.save(state, out_dir / "weights.pt")
    (out_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
