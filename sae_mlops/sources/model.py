"""Load the language model as a TransformerLens HookedTransformer.

- ``"demo"``: the embedded demo model (``sae_mlops.demo.load_demo_model``).
- a local Hugging Face checkpoint directory (``config.json`` with ``architectures``): converted the
  way ``HookedTransformer.from_pretrained`` converts a hub model, with its default processing
  (fold LayerNorm, center writing weights, center unembed, fold value biases), without any network.
- any other name: ``HookedTransformer.from_pretrained(name)`` (the hub or its local cache).

`from_pretrained_kwargs` overrides the processing flags (e.g. SAELens' recorded
``model_from_pretrained_kwargs`` such as ``{"center_writing_weights": False}``).

In a process with a model cache set (`sae_mlops.sources.model_cache.set_model_cache`, the service's
Ray actors), a model already loaded with the same name, dtype, device and kwargs is returned from it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sae_mlops.errors import InputError
from sae_mlops.sources.device import resolve_device, resolve_dtype
from sae_mlops.sources.hub import hub_errors, hub_offline_unless_reachable
from sae_mlops.sources.model_cache import ModelCache, active_model_cache
from sae_mlops.sources.types import LoadedModel

logger = logging.getLogger(__name__)

DEMO = "demo"
MODEL_HINT = "give a local checkpoint directory or 'demo'"
PROCESSING_DEFAULTS: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}
_CONFIG_KWARGS = ("default_prepend_bos", "n_ctx", "first_n_layers")
# A tokenizer's vocabulary lives in one of these (or a *.tiktoken file); tokenizer_config.json alone is not one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
# TransformerLens picks some architectures from substrings of the *name* it is given (a path here).
_NAME_SNIFFED = re.compile(r"llama|gemma", re.IGNORECASE)


def load_model(
    name: str,
    device: str = "cpu",
    dtype: str = "float32",
    from_pretrained_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load `name` (see the module docstring) on `device` ("auto" allowed) in `dtype`."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    cache = active_model_cache()
    if cache is not None:  # a long-lived process (the service's Ray actors): see sources/model_cache.py
        key = ModelCache.key(name, str(torch_dtype), device, from_pretrained_kwargs)
        return cache.get(key, lambda: _load(name, device, torch_dtype, from_pretrained_kwargs))
    return _load(name, device, torch_dtype, from_pretrained_kwargs)


def _load(name: str, device: str, torch_dtype: torch.dtype, from_pretrained_kwargs: dict[str, Any] | None) -> LoadedModel:
    kwargs = dict(from_pretrained_kwargs or {})
    if name == DEMO:
        return _load_demo(device, torch_dtype)
    path = Path(name).expanduser()
    if path.exists():
        return _load_hf_local(path, name, device, torch_dtype, kwargs)
    return _load_named(name, device, torch_dtype, kwargs)


def _load_demo(device: str, dtype: torch.dtype) -> LoadedModel:
    try:
        from sae_mlops.demo import load_demo_model
    except ImportError as exc:
        raise InputError(
            f"The demo model is not available in this installation ({exc}); give a model name or checkpoint directory."
        ) from None
    model, tokenizer = load_demo_model(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return LoadedModel(model=model, name=DEMO, tokenizer=tokenizer, source="demo")


def hf_architecture(path: Path) -> str | None:
    """architectures[0] of a Hugging Face checkpoint directory's config.json, or None."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return str(architectures[0]) if architectures else None


def _load_hf_local(path: Path, name: str, device: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> LoadedModel:
    """Convert a local Hugging Face causal-LM checkpoint into a HookedTransformer (no network)."""
    if not path.is_dir():
        raise InputError(f"Model path {name} is a file; {MODEL_HINT} (a Hugging Face checkpoint with config.json).")
    architecture = hf_architecture(path)
    if architecture is None:
        raise InputError(
            f"Model directory {name} is not a Hugging Face checkpoint (no config.json with 'architectures'); {MODEL_HINT}."
        )
    _check_tokenizer_files(path, name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"Model directory {name} has no loadable tokenizer ({_first_line(exc)}); save the tokenizer into it."
        ) from None
    _check_vocabulary(tokenizer, path, name)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            f"Model directory {name} could not be loaded by transformers ({_first_line(exc)}); check the checkpoint."
        ) from None
    hf_model.eval()
    flags = {key: bool(kwargs.pop(key, default)) for key, default in PROCESSING_DEFAULTS.items()}
    config_kwargs = {key: kwargs.pop(key) for key in _CONFIG_KWARGS if key in kwargs}
    if kwargs:
        logger.info("model %s: ignoring from_pretrained kwargs %s for a local checkpoint", name, sorted(kwargs))
    with _tl_safe_path(path, architecture) as tl_path:
        try:
            model = _hooked_from_hf(tl_path, hf_model, tokenizer, device, dtype, flags, config_kwargs)
        except (NotImplementedError, ValueError, KeyError, AttributeError, AssertionError) as exc:
            raise InputError(
                f"Model directory {name} ({architecture}) cannot be converted by TransformerLens ({_first_line(exc)}); "
                "use a TransformerLens-supported architecture."
            ) from None
    del hf_model
    model.cfg.model_name = path.resolve().name
    logger.info("loaded local checkpoint %s (%s) into a HookedTransformer", name, architecture)
    return LoadedModel(model=model, name=name, tokenizer=tokenizer, source="hf_local")


def _check_tokenizer_files(path: Path, name: str) -> None:
    """`InputError` unless the checkpoint directory holds a tokenizer's vocabulary file (without one,
    transformers builds an empty tokenizer and every text encodes to nothing)."""
    if any((path / f).is_file() for f in TOKENIZER_FILES) or any(path.glob("*.tiktoken")):
        return
    raise InputError(
        f"Model directory {name} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}...); save the model's "
        f"tokenizer into it with tokenizer.save_pretrained('{name}')."
    )


def _check_vocabulary(tokenizer: Any, path: Path, name: str) -> None:
    """`InputError` when the tokenizer cannot belong to the checkpoint: it has more entries than the
    model's embedding rows (``vocab_size`` in config.json; ids past it would fail), or fewer than half
    of them (models pad their vocabulary a little, never by half)."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    d_vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(d_vocab, int) or d_vocab < 1:
        return
    n = len(tokenizer)
    if n > d_vocab or n < d_vocab / 2:
        raise InputError(
            f"Model directory {name} has a tokenizer of {n:,} entries but the model's vocabulary is {d_vocab:,} "
            "(config.json vocab_size); save the tokenizer the model was trained with into the directory."
        )


def _hooked_from_hf(
    tl_path: str,
    hf_model: Any,
    tokenizer: Any,
    device: str,
    dtype: torch.dtype,
    flags: dict[str, bool],
    config_kwargs: dict[str, Any],
) -> Any:
    """What HookedTransformer.from_pretrained does for a hub model, for a local path and a loaded HF model."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformer_lens.utilities import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = loading.get_pretrained_model_config(
        tl_path, hf_cfg=hf_model.config.to_dict(), fold_ln=flags["fold_ln"], device=device, dtype=dtype, **config_kwargs
    )
    limit = hf_position_limit(hf_model.config.to_dict())
    if limit is not None and cfg.n_ctx > limit and "n_ctx" not in config_kwargs:
        # TransformerLens gives some architectures a fixed n_ctx (Qwen3: 8192) whatever the checkpoint
        # says; a context past the checkpoint's own limit would run silently on untrained positions.
        logger.info("model n_ctx %d capped at the checkpoint's %d positions (config.json)", cfg.n_ctx, limit)
        cfg.n_ctx = limit
    if cfg.positional_embedding_type == "shortformer":
        flags.update(fold_ln=False, center_unembed=False, center_writing_weights=False)
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        flags.update(fold_ln=False, center_writing_weights=False)
    if flags["center_unembed"] and softcap_enabled(cfg.output_logits_soft_cap):
        flags["center_unembed"] = False
    state_dict = loading.get_pretrained_state_dict(tl_path, cfg, hf_model, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **flags)
    model.move_model_modules_to_device()
    return model.eval()


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def hf_position_limit(config: dict[str, Any]) -> int | None:
    """The most positions a Hugging Face config says its model was built for: the first of
    `POSITION_FIELDS` present as a positive integer (also inside ``text_config``), else None."""
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_FIELDS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


class _tl_safe_path:
    """Context manager giving a path for TransformerLens that does not trip its name sniffing.

    TransformerLens decides some architectures from substrings of the model name ("llama", "gemma"),
    which for a local checkpoint is the path. Unless the checkpoint is a Gemma (which TransformerLens
    only knows by name), a path containing those words is replaced by a neutral symlink.
    """

    def __init__(self, path: Path, architecture: str) -> None:
        self.path = path.resolve()
        self.architecture = architecture
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> str:
        if not _NAME_SNIFFED.search(str(self.path)) or self.architecture.startswith("Gemma"):
            return str(self.path)
        self._tmp = tempfile.TemporaryDirectory(prefix="sae_mlops_ckpt_")
        link = Path(self._tmp.name) / "checkpoint"
        os.symlink(self.path, link, target_is_directory=True)
        return str(link)

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _load_named(name: str, device: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> LoadedModel:
    """HookedTransformer.from_pretrained(name), failing fast and clearly without network."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    try:
        loading.get_official_model_name(name)
    except ValueError:
        names = list(loading.make_model_alias_map())
        close = difflib.get_close_matches(name.lower(), names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(
            f"Model {name!r} is neither a local directory nor a TransformerLens model name{hint}; "
            f"give a TransformerLens model name, a local checkpoint directory or 'demo'."
        ) from None
    online = False
    try:
        with hub_offline_unless_reachable() as online, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer.from_pretrained(name, device=device, dtype=dtype, **kwargs)
    except hub_errors() as exc:
        reason = "no network?" if not online else _first_line(exc)
        raise InputError(f"Could not load model {name} from the Hugging Face hub ({reason}); {MODEL_HINT}.") from None
    model.eval()
    return LoadedModel(model=model, name=name, tokenizer=model.tokenizer, source="transformer_lens")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
