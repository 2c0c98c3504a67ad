"""The engine: the only place that runs the model. One streaming pass, many collectors.

Per batch of windows:

1. run the model to the SAE's hook once (x, the clean activations);
2. encode / decode the analysed positions with the SAE (x_hat), in one call per batch so that a
   batch-global BatchTopK rule sees exactly the analysed tokens of its batch;
3. when downstream metrics are on, continue from the hook to the residual stream after the last
   block three times: clean, SAE-spliced (x_hat at analysed positions, x elsewhere) and
   zero-ablated. For residual-stream hooks (``blocks.L.hook_resid_pre`` / ``hook_resid_post``) the
   continuation starts at the hook with TransformerLens ``start_at_layer``, so the layers before
   the hook run once, not three times, and the zero-ablated continuation is one row that holds at
   every position (:meth:`Engine._zero_final`), computed once per run. Other hooks fall back to
   hooked forward passes (clean with a cache, then two hooked).
4. unembed only the analysed rows, in cache-sized row chunks, and reduce each chunk at once to
   cross-entropies and KLs (:meth:`Engine.next_token_stats`): no [batch, pos, vocab] tensor is made.
5. hand a :class:`StepData` to every collector.

Batches are right-padded, so causal attention never looks at padding and no attention mask is needed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_mlops.core.collectors.base import Collector, StepData
from sae_mlops.errors import InputError
from sae_mlops.core.tokens import TokenBatch

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
    cpu_seconds: float = 0.0  # CPU time of the process during the pass (all threads)
    #: seconds inside the pass: "batches" (tokenising and collating), "model" (model, SAE and
    #: CE/KL: :meth:`Engine.step`), "sparse_codes" (finding the codes' non-zeros once per batch),
    #: then one entry per collector (its ``update``); on CUDA each part is synchronised first
    part_seconds: dict[str, float] = field(default_factory=dict)
    part_cpu_seconds: dict[str, float] = field(default_factory=dict)  # the same in process CPU time

    def add(self, other: "PassStats") -> None:
        """Fold in the stats of another part of the pass (a shard): counts and seconds add up."""
        for name in ("batches", "windows", "tokens_analysed", "tokens_in_batches", "predictions", "seconds", "cpu_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.part_seconds, other.part_seconds), (self.part_cpu_seconds, other.part_cpu_seconds)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v


class Engine:
    """Runs model + SAE over token batches and feeds collectors."""

    #: compute the zero-ablated continuation once as one row on the residual fast path (exact;
    #: see :meth:`_zero_final`); False runs it in full for every batch (benchmarks compare both)
    constant_zero_ablation: bool = True

    def __init__(self, model, sae, site: HookSite, device: str = "cpu", downstream: bool = True):
        self.model = model
        self.sae = sae
        self.site = site
        self.device = device
        self.downstream = downstream
        self.sae_dtype = _module_dtype(sae)
        self.n_layers = int(model.cfg.n_layers)
        # hooks after the last block (ln_final.*, unembed.*) have no final residual to stop at
        self.final_is_logits = site.name.startswith(("ln_final", "unembed"))
        self.vocab_chunk_elements = vocab_chunk_elements(device)
        self._scratch_bufs: list[torch.Tensor] = []
        self._zero_row: torch.Tensor | bool | None = None  # see _zero_final; False: not constant
        if site.name.endswith("hook_z") and hasattr(sae, "turn_off_forward_pass_hook_z_reshaping"):
            # We hand the SAE flattened [n, n_heads * d_head] rows ourselves (as SAELens run_evals does).
            if getattr(sae, "hook_z_reshaping_mode", False):
                sae.turn_off_forward_pass_hook_z_reshaping()

    # -- model compute -----------------------------------------------------------------------
    @torch.no_grad()
    def hook_activations(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(raw hook activation, clean final output or None). Residual fast path returns None.

        The final output is what :meth:`continue_to_final` returns for the clean activation."""
        if self.site.resume_layer is not None:
            resid = self.model(tokens, stop_at_layer=self.site.resume_layer, padding_side="right")
            return resid, None
        if self.downstream:
            stop = None if self.final_is_logits else self.n_layers
        else:
            stop = _stop_layer(self.site.name)
        out, cache = self.model.run_with_cache(
            tokens, names_filter=[self.site.name], stop_at_layer=stop, padding_side="right"
        )
        return cache[self.site.name], (out if self.downstream else None)

    @torch.no_grad()
    def continue_to_logits(self, act: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] from a (possibly edited) hook activation onward, at every position."""
        if self.site.resume_layer is not None:
            return self.model(act, start_at_layer=self.site.resume_layer, return_type="logits")
        return self.model.run_with_hooks(
            tokens, fwd_hooks=[(self.site.name, _replace_with(act))], return_type="logits", padding_side="right"
        )

    @torch.no_grad()
    def continue_to_final(self, act: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block [B, L, d_model] from a hook activation onward
        (logits instead when the hook sits after the last block, e.g. ``ln_final.*``)."""
        if self.final_is_logits:
            return self.continue_to_logits(act, tokens)
        if self.site.resume_layer is not None:
            return self.model(act, start_at_layer=self.site.resume_layer, stop_at_layer=self.n_layers)
        return self.model.run_with_hooks(
            tokens, fwd_hooks=[(self.site.name, _replace_with(act))], stop_at_layer=self.n_layers,
            padding_side="right",
        )

    @torch.no_grad()
    def _zero_final(self, act: torch.Tensor, tokens: torch.Tensor, analysed: torch.Tensor) -> torch.Tensor:
        """Final rows of the zero-ablated continuation: [n, d_model], or [1, d_model] when one row
        stands for every position.

        Why one row can: on the residual fast path the ablated residual is 0 at every position,
        so every later block sees the same input at every position. Attention then mixes identical
        values (its weights sum to 1), so its output is the same everywhere whatever the pattern
        (causal mask, rotary, ALiBi, local windows), and so are the MLP's and the norms'. The row is
        a constant of model and hook: it is computed once, from a [1, 1, d_model] zero input, and
        checked against the full continuation of the first batch; if they differ (a model that
        injects positions after the hook) the full continuation is used throughout, with a warning.
        """
        if self.site.resume_layer is None or not self.constant_zero_ablation or self._zero_row is False:
            return self.continue_to_final(self.site.zero(act), tokens)[analysed]
        if self._zero_row is not None:
            return self._zero_row  # type: ignore[return-value]  # a tensor here (False is handled above)
        row = self.continue_to_final(act.new_zeros((1, 1, act.shape[-1])), tokens[:1, :1])[0]
        full = self.continue_to_final(self.site.zero(act), tokens)[analysed]
        scale = float(full.abs().max()) if full.numel() else 0.0
        tol = 64 * torch.finfo(full.dtype).eps * max(scale, 1.0)
        if full.numel() and float((full - row).abs().max()) <= tol:
            self._zero_row = row
        else:
            self._zero_row = False
            log.warning("the zero-ablated continuation differs between positions at %s; running it in full", self.site.name)
        return full

    def _final_norm(self, final: torch.Tensor) -> torch.Tensor:
        """The model's ``ln_final`` applied to final-residual rows [n, d_model] (per row)."""
        if self.final_is_logits or self.model.cfg.normalization_type is None:
            return final
        return self.model.ln_final(final[None])[0]

    def _logits_into(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Float32 logits of normalised final rows [m, d_model] written into ``out`` [m, vocab]:
        ``rows @ W_U + b_U``, then the model's output soft cap ``cap * tanh(z / cap)`` when it has
        one, as TransformerLens's forward does. Why not ``model.unembed``: it copies ``W_U.T`` on
        every call (a full unembedding copy per row chunk), and writing into reused buffers saves
        the page faults of fresh [m, vocab] allocations."""
        if self.final_is_logits:
            return out.copy_(rows)
        w_u, b_u = self.model.W_U, self.model.b_U
        if w_u.dtype == out.dtype:
            torch.addmm(b_u, rows, w_u, out=out)
        else:
            out.copy_(torch.addmm(b_u, rows, w_u))
        cap = self.model.cfg.output_logits_soft_cap
        if cap is not None and cap > 0:
            out.div_(cap).tanh_().mul_(cap)
        return out

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
        act, clean_final = self.hook_activations(tokens)
        view = self.site.view(act)
        x = view[analysed]
        f, x_hat = self.encode_decode(x)
        step = StepData(batch=batch, x=x.float(), f=f, x_hat=x_hat.float())
        if not self.downstream:
            return step
        spliced = view.clone()
        spliced[analysed] = x_hat.to(view.dtype)
        if clean_final is None:
            clean_final = self.continue_to_final(act, tokens)
        finals = (
            clean_final[analysed],
            self.continue_to_final(self.site.write(act, spliced), tokens)[analysed],
            self._zero_final(act, tokens, analysed),
        )
        predicts = torch.nn.functional.pad(batch.predicts, (0, 1)).to(self.device)[analysed]
        next_token = torch.nn.functional.pad(tokens[:, 1:], (0, 1))[analysed]
        ce, kl = self.next_token_stats(finals, next_token)
        step.ce_clean, step.ce_sae, step.ce_zero = (c[predicts] for c in ce)
        step.kl_sae, step.kl_zero = kl
        return step

    def _scratch(self, rows: int, d_vocab: int) -> list[torch.Tensor]:
        """Four reusable float32 [rows, vocab] buffers (logits, clean log-probs, clean probs,
        edited log-probs), kept across batches and grown when a larger chunk needs them."""
        bufs = self._scratch_bufs
        if not bufs or bufs[0].shape[0] < rows or bufs[0].shape[1] != d_vocab:
            bufs = [torch.empty(rows, d_vocab, device=self.device) for _ in range(4)]
            self._scratch_bufs = bufs
        return bufs

    @torch.no_grad()
    def next_token_stats(
        self, finals: Sequence[torch.Tensor], next_token: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Cross-entropies and KLs from the clean and edited final rows (``finals[0]`` clean, [n,
        d_model]; an edited variant may be one row [1, d_model] that holds at every position).

        For row t with log-probabilities lp = log_softmax(logits) over the vocabulary v:

        - ``CE(t) = -lp[next_token(t)]`` (nats), for every variant;
        - ``KL(p_clean || p_x)(t) = sum_v p_clean,v (lp_clean,v - lp_x,v)`` (nats), for every edited
          variant x.

        Logits are made in row chunks of about ``vocab_chunk_elements / vocab`` rows (see
        :func:`vocab_chunk_elements`), so no [n, vocab] tensor is ever held.
        Returns ([ce per variant], [kl per edited variant]), each [n] float32.
        """
        n = int(finals[0].shape[0])
        d_vocab = int(self.model.cfg.d_vocab_out)
        rows = max(1, self.vocab_chunk_elements // max(d_vocab, 1))
        finals = [self._final_norm(final) for final in finals]
        ce = [torch.empty(n, device=self.device) for _ in finals]
        kl = [torch.empty(n, device=self.device) for _ in finals[1:]]
        z_buf, lp_clean_buf, p_clean_buf, lp_buf = self._scratch(max(1, min(rows, n)), d_vocab)
        # variants given as one row (the same at every position): log-probs once, broadcast
        constant = {
            i: torch.log_softmax(self._logits_into(final, z_buf[:1]), dim=-1).clone()
            for i, final in enumerate(finals)
            if i > 0 and final.shape[0] == 1
        }
        for s in range(0, n, rows):
            sl = slice(s, s + rows)
            m = min(rows, n - s)
            z, lp_clean, p_clean, lp = z_buf[:m], lp_clean_buf[:m], p_clean_buf[:m], lp_buf[:m]
            target = next_token[sl, None]
            torch.log_softmax(self._logits_into(finals[0][sl], z), dim=-1, out=lp_clean)
            torch.exp(lp_clean, out=p_clean)
            ce[0][sl] = -lp_clean.gather(-1, target)[:, 0]
            for i, final in enumerate(finals[1:], start=1):
                if i in constant:
                    lp_x = constant[i]
                    ce[i][sl] = -lp_x[0, target[:, 0]]
                else:
                    lp_x = torch.log_softmax(self._logits_into(final[sl], z), dim=-1, out=lp)
                    ce[i][sl] = -lp_x.gather(-1, target)[:, 0]
                kl[i - 1][sl] = torch.sub(lp_clean, lp_x, out=lp).mul_(p_clean).sum(-1)
        return ce, kl

    # -- the pass ----------------------------------------------------------------------------
    def run(
        self,
        batches: Iterable[TokenBatch],
        collectors: Sequence[Collector],
        total_tokens: int | None = None,
        progress: bool = True,
        desc: str = "analysing",
        on_step: Callable[[StepData], None] | None = None,
        token_offset: int = 0,
        bar: Any = None,
    ) -> PassStats:
        """Feed every batch to every collector. token_offset: the global index of the first analysed
        token (a shard's start); bar: a progress bar to advance (one spanning many shards) instead
        of a bar of this call's own."""
        stats = PassStats()
        parts, cpu_parts = stats.part_seconds, stats.part_cpu_seconds
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda: None)
        cpu = [time.process_time()]

        def timed(name: str, t0: float) -> float:
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            parts[name] = parts.get(name, 0.0) + (t1 - t0)
            cpu_parts[name] = cpu_parts.get(name, 0.0) + (c1 - cpu[0])
            cpu[0] = c1
            return t1

        start, cpu_start = time.perf_counter(), time.process_time()
        own_bar = bar is None
        if own_bar:
            bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, disable=not progress)
        try:
            t, cpu[0] = time.perf_counter(), time.process_time()
            for batch in batches:
                t = timed("batches", t)
                step = self.step(batch)
                t = timed("model", t)
                step.token_start = token_offset + stats.tokens_analysed
                if collectors:
                    step.sparse  # noqa: B018 - found once here so that its cost is named
                    t = timed("sparse_codes", t)
                for c in collectors:
                    c.update(step)
                    t = timed(getattr(c, "name", type(c).__name__), t)
                if on_step is not None:
                    on_step(step)
                stats.batches += 1
                stats.windows += int(batch.tokens.shape[0])
                stats.tokens_analysed += int(step.x.shape[0])
                stats.tokens_in_batches += int(batch.valid.sum())
                stats.predictions += int(batch.predicts.sum())
                bar.update(int(step.x.shape[0]))
                t, cpu[0] = time.perf_counter(), time.process_time()
        finally:
            if own_bar:
                bar.close()
        stats.seconds = time.perf_counter() - start
        stats.cpu_seconds = time.process_time() - cpu_start
        return stats


def _module_dtype(module) -> torch.dtype:
    for p in module.parameters() if hasattr(module, "parameters") else []:
        return p.dtype
    return torch.float32


def _stop_layer(hook_name: str) -> int | None:
    """The first block after the hook's block, to cut a hooked forward short when no logits are needed."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) + 1 if m else None


def _replace_with(value: torch.Tensor):
    """A TransformerLens hook that returns ``value`` in place of the activation."""

    def replace(_act, hook):  # noqa: ARG001 - TransformerLens hook signature
        return value

    return replace


def vocab_chunk_elements(device: str) -> int:
    """Elements per [rows, vocab] logits chunk: 2^23 (32 MB of float32, 256 rows at a 32k
    vocabulary; the four scratch buffers take 128 MB) on a CPU; on an accelerator up to 2^26
    (256 MB; few, large kernels), at most 1/32 of the device's free memory (the four float32
    scratch buffers then take at most half of it).

    Why not a cache-sized chunk on the CPU: every chunk reads the whole unembedding (64 MB at
    d_model 512, vocab 32768), so 16-row chunks made the CE/KL reduction of 2032 rows cost 3.8x two
    plain unembedding GEMMs; 256-row chunks cost 1.4x (measured on this project's 2-core machine,
    one thread: 3.92 against 1.42 CPU-s)."""
    if str(device).startswith("cpu"):
        return 1 << 23
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(max(1 << 20, min(1 << 26, free // 32 // 4)))
    return 1 << 26
