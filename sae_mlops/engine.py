"""The engine: the only place that runs the model. One streaming pass, many collectors.

Per batch of windows:

1. run the model to the SAE's hook once (x, the clean activations);
2. encode / decode the analysed positions with the SAE (x_hat), in one call per batch so that a
   batch-global BatchTopK rule sees exactly the analysed tokens of its batch;
3. when downstream metrics are on, continue from the hook to the logits three times: clean,
   SAE-spliced (x_hat at analysed positions, x elsewhere) and zero-ablated. For residual-stream
   hooks (``blocks.L.hook_resid_pre`` / ``hook_resid_post``) the continuation starts at the hook
   with TransformerLens ``start_at_layer``, so the layers before the hook run once, not three
   times. Other hooks fall back to hooked full forward passes (clean with a cache, then two hooked).
4. hand a :class:`StepData` to every collector.

Batches are right-padded, so causal attention never looks at padding and no attention mask is needed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sae_mlops.collectors.base import Collector, StepData
from sae_mlops.errors import InputError
from sae_mlops.tokens import TokenBatch

log = logging.getLogger(__name__)

_RESID = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")
_HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class HookSite:
    """Where the SAE reads and writes: the hook, and how to view its activation as [B, L, d_in]."""

    name: str
    resume_layer: int | None  # start/stop layer for the residual fast path; None: hooked fallback
    head_index: int | None = None
    head_dims: bool = False  # activation is [B, L, H, Dh]

    @classmethod
    def for_model(cls, model, hook_name: str, head_index: int | None = None) -> "HookSite":
        if hook_name not in model.hook_dict:
            raise InputError(f"the model has no hook named '{hook_name}'; pass --hook with one of its hook names.")
        head_dims = any(hook_name.endswith(h) for h in _HEAD_HOOKS) and "." in hook_name
        m = _RESID.fullmatch(hook_name)
        resume = None
        if m and head_index is None and model.cfg.positional_embedding_type != "shortformer":
            layer = int(m.group(1))
            resume = layer if m.group(2) == "pre" else layer + 1
        return cls(hook_name, resume, head_index, head_dims)

    def view(self, act: torch.Tensor) -> torch.Tensor:
        """The SAE's input [B, L, d_in] from the hook activation."""
        if self.head_index is not None:
            return act[:, :, self.head_index]
        if self.head_dims and act.dim() == 4:
            return act.flatten(-2, -1)
        return act

    def write(self, act: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The hook activation with its SAE view replaced by ``values`` [B, L, d_in]."""
        if self.head_index is not None:
            act = act.clone()
            act[:, :, self.head_index] = values.to(act.dtype)
            return act
        return values.reshape(act.shape).to(act.dtype)

    def zero(self, act: torch.Tensor) -> torch.Tensor:
        if self.head_index is not None:
            act = act.clone()
            act[:, :, self.head_index] = 0
            return act
        return torch.zeros_like(act)


@dataclass
class PassStats:
    batches: int = 0
    windows: int = 0
    tokens_analysed: int = 0
    tokens_in_batches: int = 0  # real (non-padding) tokens, specials included
    predictions: int = 0  # next-token predictions (analysed t, real t+1)
    seconds: float = 0.0


class Engine:
    """Runs model + SAE over token batches and feeds collectors."""

    def __init__(self, model, sae, site: HookSite, device: str = "cpu", downstream: bool = True):
        self.model = model
        self.sae = sae
        self.site = site
        self.device = device
        self.downstream = downstream
        self.sae_dtype = _module_dtype(sae)
        if site.name.endswith("hook_z") and hasattr(sae, "turn_off_forward_pass_hook_z_reshaping"):
            # We hand the SAE flattened [n, n_heads * d_head] rows ourselves (as SAELens run_evals does).
            if getattr(sae, "hook_z_reshaping_mode", False):
                sae.turn_off_forward_pass_hook_z_reshaping()

    # -- model compute -----------------------------------------------------------------------
    @torch.no_grad()
    def hook_activations(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(raw hook activation, clean logits or None). Residual fast path returns no logits."""
        if self.site.resume_layer is not None:
            resid = self.model(tokens, stop_at_layer=self.site.resume_layer, padding_side="right")
            return resid, None
        stop = None if self.downstream else _stop_layer(self.site.name)
        out, cache = self.model.run_with_cache(
            tokens, names_filter=[self.site.name], stop_at_layer=stop, padding_side="right"
        )
        return cache[self.site.name], (out if self.downstream else None)

    @torch.no_grad()
    def _continue(self, act: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from a (possibly edited) hook activation onward."""
        if self.site.resume_layer is not None:
            return self.model(act, start_at_layer=self.site.resume_layer, return_type="logits")

        def replace(_act, hook):  # noqa: ARG001 - TransformerLens hook signature
            return act

        return self.model.run_with_hooks(
            tokens, fwd_hooks=[(self.site.name, replace)], return_type="logits", padding_side="right"
        )

    @torch.no_grad()
    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.sae.encode(x.to(self.sae_dtype))
        if f.is_sparse:
            f = f.to_dense()
        x_hat = self.sae.decode(f)
        return f, x_hat

    @torch.no_grad()
    def step(self, batch: TokenBatch) -> StepData:
        tokens = batch.tokens.to(self.device)
        analysed = batch.analysed.to(self.device)
        act, clean_logits = self.hook_activations(tokens)
        view = self.site.view(act)
        x = view[analysed]
        f, x_hat = self.encode_decode(x)
        step = StepData(batch=batch, x=x.float(), f=f, x_hat=x_hat.float())
        if not self.downstream:
            return step
        spliced = view.clone()
        spliced[analysed] = x_hat.to(view.dtype)
        if clean_logits is None:
            clean_logits = self._continue(act, tokens)
        sae_logits = self._continue(self.site.write(act, spliced), tokens)
        zero_logits = self._continue(self.site.zero(act), tokens)
        # Work on the analysed rows only ([n, vocab]). Predictions are the analysed rows whose next
        # position is a real token. KL(p || q) = sum p log p - sum p log q, the second term as a
        # row-wise dot product (no [n, vocab] temporaries).
        predicts = torch.nn.functional.pad(batch.predicts, (0, 1)).to(self.device)[analysed]
        next_token = torch.nn.functional.pad(tokens[:, 1:], (0, 1))[analysed][:, None]
        lp_clean = _log_probs(clean_logits[analysed])
        del clean_logits
        step.ce_clean = -lp_clean.gather(-1, next_token).squeeze(-1)[predicts]
        p_clean = lp_clean.exp()
        neg_entropy = _rowdot(p_clean, lp_clean)
        for name, logits in (("sae", sae_logits), ("zero", zero_logits)):
            lp = _log_probs(logits[analysed])
            setattr(step, f"ce_{name}", -lp.gather(-1, next_token).squeeze(-1)[predicts])
            setattr(step, f"kl_{name}", neg_entropy - _rowdot(p_clean, lp))
            del lp
        return step

    # -- the pass ----------------------------------------------------------------------------
    def run(
        self,
        batches: Iterable[TokenBatch],
        collectors: Sequence[Collector],
        total_tokens: int | None = None,
        progress: bool = True,
        desc: str = "analysing",
        on_step: Callable[[StepData], None] | None = None,
    ) -> PassStats:
        stats = PassStats()
        start = time.perf_counter()
        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, disable=not progress)
        try:
            for batch in batches:
                step = self.step(batch)
                step.token_start = stats.tokens_analysed
                for c in collectors:
                    c.update(step)
                if on_step is not None:
                    on_step(step)
                stats.batches += 1
                stats.windows += int(batch.tokens.shape[0])
                stats.tokens_analysed += int(step.x.shape[0])
                stats.tokens_in_batches += int(batch.valid.sum())
                stats.predictions += int(batch.predicts.sum())
                bar.update(int(step.x.shape[0]))
        finally:
            bar.close()
        stats.seconds = time.perf_counter() - start
        return stats


def _module_dtype(module) -> torch.dtype:
    for p in module.parameters() if hasattr(module, "parameters") else []:
        return p.dtype
    return torch.float32


def _stop_layer(hook_name: str) -> int | None:
    """The first block after the hook's block, to cut a hooked forward short when no logits are needed."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) + 1 if m else None


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two [n, v] tensors, without an [n, v] temporary."""
    return torch.einsum("nv,nv->n", a, b)
