"""Typed inputs resolved by `sae_mlops.sources`: the SAE, the model and the corpus.

These are the contracts between sources (which resolve what the user named) and the engine
(which runs the single streaming pass). Nothing here loads anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class SAEModule(Protocol):
    """What the engine needs of an SAE.

    `encode` maps hook activations x [n_tokens, d_in] (already flattened, only analysed tokens) to
    feature activations f [n_tokens, d_sae]; `decode` maps f back to x_hat [n_tokens, d_in].
    For a batch-global BatchTopK SAE the code of a token depends on the other rows passed in the same
    call, so the engine calls `encode` once per batch on exactly the analysed tokens of that batch.
    """

    W_dec: torch.Tensor  # [d_sae, d_in]
    W_enc: torch.Tensor  # [d_in, d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SAEInfo:
    """Metadata about a loaded SAE, as recorded in its files or resolved from the user's input."""

    source: str  # what the user named (path, release/id, runs:/..., models:/...)
    format: str  # "legacy" (prior tool's directory), "saelens" (cfg.json dir), "saelens-release"
    architecture: str  # "standard", "batchtopk", "jumprelu", "topk", "gated", ...
    hook_name: str  # full TransformerLens hook name, e.g. "blocks.1.hook_resid_post"
    d_in: int
    d_sae: int
    hook_layer: int | None = None
    hook_head_index: int | None = None
    model_name: str | None = None  # model the SAE was trained on, if recorded
    prepend_bos: bool | None = None  # whether training windows began with BOS, if recorded
    context_size: int | None = None  # training context size, if recorded
    dtype: str = "float32"
    # BatchTopK in the prior format only
    k: int | None = None
    topk_mode: str | None = None  # "batch" | "threshold"
    threshold: float | None = None  # theta used in threshold mode (given or estimated)
    # Training-time facts from the prior format
    ever_fired: torch.Tensor | None = None  # bool [d_sae]
    history: dict[str, list[float]] | None = None
    # Where it came from
    local_path: Path | None = None
    content_hash: str | None = None  # sha256 over the weight/config files
    lineage: dict[str, str] = field(default_factory=dict)  # MLflow tags: source run, model, version
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedSAE:
    module: SAEModule
    info: SAEInfo


@dataclass
class LoadedModel:
    """A HookedTransformer plus what we resolved about it."""

    model: Any  # transformer_lens.HookedTransformer
    name: str  # what the user named, or "demo"
    tokenizer: Any  # a Hugging Face tokenizer
    source: str  # "transformer_lens", "hf_local", "demo"


@dataclass
class Corpus:
    """Documents to analyse (empty / whitespace-only texts already dropped)."""

    texts: list[str]
    path: str
    format: str  # "json", "jsonl", "parquet", "txt", "demo"
    n_dropped_empty: int = 0
    digest: str | None = None  # sha256 of the file bytes (or of the texts)
