"""Hook activations of labelled texts, run once per (model, hook, data, pooling) and cached on disk.

Each text is tokenized without special tokens and cut to its first window (``context_size`` tokens, a
BOS first when ``prepend_bos``); the model runs to the hook through `sae_mlops.core.engine.Engine`
(the one place that runs the model) in batches of texts. Kept per text:

- ``mean`` pooling: the activations at every analysed (non-special) position, so that both the raw
  mean and the mean of the SAE's codes can be formed later (the mean of codes is not the code of the
  mean);
- ``last`` pooling: the activation at the last analysed position only.

:class:`TokenActivations` holds them as one float32 matrix ``values`` [N, d_in] and row offsets
(text i owns rows ``offsets[i]:offsets[i+1]``). The cache file is
``<cache_dir>/<key>.safetensors`` with ``key`` = sha256 over the model fingerprint (its config and
token-embedding bytes), the hook (and head index), the dataset digest, context size, BOS rule, pooling
and dtype, so five SAEs of one hook probed on one dataset run the model once. Written to a temporary
name and renamed, so an interrupted run never leaves a torn file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

Pooling = Literal["mean", "last"]
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "sae-mlops" / "activations"


@dataclass
class TokenActivations:
    """Per-text activation rows: text i owns ``values[offsets[i]:offsets[i+1]]``."""

    values: np.ndarray  # [N, d_in] float32
    offsets: np.ndarray  # [n_texts + 1] int64

    def pooled(self) -> np.ndarray:
        """The mean of each text's rows [n_texts, d_in] (float64 sums; the last row is its own mean)."""
        sums = np.add.reduceat(self.values.astype(np.float64), self.offsets[:-1], axis=0)
        counts = np.diff(self.offsets)[:, None]
        return (sums / counts).astype(np.float32)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    model_seconds: float = 0.0


def model_fingerprint(model: Any) -> str:
    """sha256 over a HookedTransformer's config and its token-embedding bytes (a retrained checkpoint
    of the same shape gets a new fingerprint)."""
    h = hashlib.sha256()
    cfg = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else vars(model.cfg)
    h.update(json.dumps({k: str(v) for k, v in sorted(cfg.items())}).encode())
    h.update(model.W_E.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(model_fp: str, hook: str, head_index: int | None, digest: str, context_size: int, prepend_bos: bool,
              pooling: str, dtype: str) -> str:
    parts = [model_fp, hook, str(head_index), digest, str(context_size), str(prepend_bos), pooling, dtype]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def load_cached(path: Path) -> TokenActivations | None:
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        d = load_file(str(path))
        return TokenActivations(d["values"], d["offsets"])
    except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed
        log.warning("ignoring the damaged activation cache %s (%s)", path, e)
        return None


def save_cached(path: Path, acts: TokenActivations, meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"values": np.ascontiguousarray(acts.values), "offsets": acts.offsets}, str(tmp), metadata=meta)
    os.replace(tmp, path)


@torch.no_grad()
def text_activations(
    engine: Any,
    tokenizer: Any,
    texts: list[str],
    context_size: int,
    prepend_bos: bool,
    pooling: Pooling,
    batch_size: int = 16,
) -> TokenActivations:
    """Hook activations of each text's analysed positions (all of them for ``mean``, the last for
    ``last``), one model call per `batch_size` texts. A text with no analysed token raises InputError."""
    from sae_mlops.core.tokens import Window, collate, make_plan
    from sae_mlops.errors import InputError

    plan = make_plan(tokenizer, context_size, prepend_bos)
    body = context_size - (1 if prepend_bos else 0)
    chunks: list[np.ndarray] = []
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        part = texts[start : start + batch_size]
        ids = tokenizer(part, add_special_tokens=False)["input_ids"]
        windows = [
            Window(start + i, 0, ([plan.bos_id] if prepend_bos and plan.bos_id is not None else []) + list(t[:body]), prepend_bos)
            for i, t in enumerate(ids)
        ]
        empty = [w.doc_index for w in windows if len(w.tokens) == (1 if prepend_bos else 0)]
        if empty:
            raise InputError(f"text {empty[0]} tokenizes to nothing; drop empty texts from the dataset.")
        batch = collate(windows, plan)
        tokens = batch.tokens.to(engine.device)
        act, _ = engine.hook_activations(tokens)
        view = engine.site.view(act).float().cpu()
        analysed = batch.analysed
        for i in range(len(windows)):
            rows = view[i][analysed[i]]
            if rows.shape[0] == 0:
                raise InputError(f"text {start + i} holds only special tokens; drop it from the dataset.")
            if pooling == "last":
                rows = rows[-1:]
            chunks.append(rows.numpy())
            counts.append(int(rows.shape[0]))
    values = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return TokenActivations(values, offsets)


@torch.no_grad()
def pooled_codes(sae: Any, acts: TokenActivations, texts_per_call: int = 16, device: str = "cpu") -> np.ndarray:
    """The mean over each text's rows of the SAE's codes [n_texts, d_sae] (float32).

    The SAE encodes the rows of `texts_per_call` texts in one call (a batch-global BatchTopK SAE ranks
    within that call, as the analysis ranks within a batch of windows)."""
    dtype = next(iter(sae.parameters())).dtype if hasattr(sae, "parameters") else torch.float32
    n = len(acts.offsets) - 1
    out: list[np.ndarray] = []
    for start in range(0, n, texts_per_call):
        stop = min(n, start + texts_per_call)
        lo, hi = int(acts.offsets[start]), int(acts.offsets[stop])
        f = sae.encode(torch.from_numpy(acts.values[lo:hi]).to(device=device, dtype=dtype))
        if f.is_sparse:
            f = f.to_dense()
        f = f.float().cpu().numpy().astype(np.float64)
        local = acts.offsets[start : stop + 1] - lo
        sums = np.add.reduceat(f, local[:-1], axis=0)
        out.append((sums / np.diff(local)[:, None]).astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def cached_text_activations(
    engine: Any,
    tokenizer: Any,
    texts: list[str],
    digest: str,
    *,
    model_fp: str,
    context_size: int,
    prepend_bos: bool,
    pooling: Pooling,
    dtype: str,
    batch_size: int,
    cache_dir: Path | None,
    stats: CacheStats | None = None,
) -> TokenActivations:
    """:func:`text_activations` through the disk cache (``cache_dir`` None: no cache)."""
    import time

    stats = stats if stats is not None else CacheStats()
    path = None
    if cache_dir is not None:
        key = cache_key(model_fp, engine.site.name, engine.site.head_index, digest, context_size, prepend_bos, pooling, dtype)
        path = Path(cache_dir) / f"{key}.safetensors"
        hit = load_cached(path)
        if hit is not None and len(hit.offsets) == len(texts) + 1:
            stats.hits += 1
            log.info("activations of %d texts from the cache %s", len(texts), path)
            return hit
    stats.misses += 1
    t0 = time.perf_counter()
    acts = text_activations(engine, tokenizer, texts, context_size, prepend_bos, pooling, batch_size)
    stats.model_seconds += time.perf_counter() - t0
    if path is not None:
        save_cached(path, acts, {"hook": engine.site.name, "digest": digest, "pooling": pooling,
                                 "context_size": str(context_size), "prepend_bos": str(prepend_bos)})
    return acts
