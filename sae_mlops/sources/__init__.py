"""Resolve what the user named (SAE, model, corpus) into typed inputs and check they fit together.

Public entry points (imported lazily so that ``import sae_mlops.sources`` stays cheap):

- :func:`load_sae` (``sae_mlops.sources.sae``): prior-format or SAELens directory, ``release:sae_id``,
  ``runs:/`` and ``models:/`` URIs.
- :func:`load_model` (``sae_mlops.sources.model``): ``demo``, a local Hugging Face checkpoint, or a
  TransformerLens model name.
- :func:`load_corpus` (``sae_mlops.sources.corpus``): JSON list[str], JSONL, Parquet, plain text, ``demo``.
- :func:`check_compatible` (``sae_mlops.sources.validate``): hook, width, tokenizer, model name.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_sae": "sae_mlops.sources.sae",
    "load_model": "sae_mlops.sources.model",
    "load_corpus": "sae_mlops.sources.corpus",
    "check_compatible": "sae_mlops.sources.validate",
    "LegacyBatchTopKSAE": "sae_mlops.sources.legacy_batchtopk",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
