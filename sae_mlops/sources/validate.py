"""Check that an SAE and a model fit together before any heavy work.

Errors (InputError): the hook is not one of the model's hooks; the SAE's ``d_in`` differs from the
hook's width; the model has no tokenizer. Warnings (returned): the SAE records another model than the
one given (unless the given model's architecture family is the recorded model's, e.g. a local copy); the hook was overridden; the SAE asks for model loading options that were not used.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from typing import Any

import torch

from sae_mlops.errors import InputError
from sae_mlops.sources.types import LoadedModel, LoadedSAE

logger = logging.getLogger(__name__)

_LAYER_IN_HOOK = re.compile(r"^blocks\.(\d+)\.")
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_tokens")


def check_compatible(sae: LoadedSAE, model: LoadedModel, hook_override: str | None = None) -> list[str]:
    """Raise InputError if `sae` cannot run on `model`; return warnings for what merely looks off."""
    info = sae.info
    hooked = model.model
    hook = hook_override or info.hook_name
    warnings: list[str] = []
    origin = "--hook" if hook_override else f"the SAE {info.source}"
    if hook not in hooked.hook_dict:
        raise InputError(
            f"Hook {hook} (from {origin}) is not a hook of model {model.name}; valid hooks include "
            f"{', '.join(suggest_hooks(hooked, hook))}; pass --hook with one of them."
        )
    if hook_override and hook_override != info.hook_name:
        warnings.append(f"Using hook {hook_override} instead of the SAE's recorded hook {info.hook_name}.")
    _check_head_index(info.hook_head_index, hooked, hook, info.source)
    width = hook_width(hooked, hook, info.hook_head_index)
    if width != info.d_in:
        recorded = f" (it records model {info.model_name})" if info.model_name else ""
        raise InputError(
            f"SAE {info.source} has d_in={info.d_in} but hook {hook} of model {model.name} has width {width}; "
            f"give the model the SAE was trained on{recorded} or a --hook of width {info.d_in}."
        )
    if model.tokenizer is None and getattr(hooked, "tokenizer", None) is None:
        raise InputError(
            f"Model {model.name} has no tokenizer; give a checkpoint directory that includes its tokenizer files."
        )
    name_warning = model_name_warning(info.model_name, model)
    if name_warning:
        warnings.append(name_warning)
    for message in warnings:
        logger.debug("compatibility: %s", message)
    return warnings


def suggest_hooks(hooked: Any, hook: str, n: int = 5) -> list[str]:
    """Up to `n` of the model's hook names closest to `hook` (residual-stream hooks when none is close)."""
    names = list(hooked.hook_dict)
    close = difflib.get_close_matches(hook, names, n=n, cutoff=0.5)
    if close:
        return close
    resid = [name for name in names if "hook_resid" in name]
    return (resid or names)[:n]


def hook_width(hooked: Any, hook: str, head_index: int | None = None) -> int:
    """Width of the SAE input at `hook`: the last dimension, or heads x d_head flattened for per-head
    hooks (hook_z, hook_q...) unless `head_index` picks one head. Found by a 2-token forward pass that
    stops right after the hook's block."""
    tokens = torch.zeros((1, 2), dtype=torch.long, device=_device(hooked))
    with torch.no_grad():
        _, cache = hooked.run_with_cache(tokens, names_filter=[hook], stop_at_layer=_stop_layer(hooked, hook))
    act = cache[hook]
    per_position = tuple(act.shape[2:])
    if head_index is not None and len(per_position) == 2:
        return int(per_position[-1])
    return int(math.prod(per_position))


def model_name_warning(sae_model_name: str | None, model: LoadedModel) -> str | None:
    """A warning when the SAE records a model other than `model`, else None ("demo" matches the demo)."""
    if not sae_model_name:
        return None
    wanted = _name_forms(sae_model_name)
    given = _name_forms(model.name) | _name_forms(getattr(getattr(model.model, "cfg", None), "model_name", None))
    if model.source == "demo":
        given |= {"demo"}
    if wanted & given:
        return None
    architecture = getattr(getattr(model.model, "cfg", None), "original_architecture", None)
    if same_family(sae_model_name, architecture):
        # A local copy or fine-tune under another folder name: the hook width already matched the SAE.
        logger.info(
            "The SAE records model %s; the model given, %s, is a %s of the width the SAE expects: taken to be "
            "that model (a copy or a fine-tune of it).", sae_model_name, model.name, architecture,
        )
        return None
    return f"The SAE was trained on model {sae_model_name} but the model given is {model.name}; results may be meaningless."


_ARCH_SUFFIXES = re.compile(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration|Model)$")
# Architecture families whose published checkpoints carry another name than the architecture's.
FAMILY_ALIASES: dict[str, tuple[str, ...]] = {"gptneox": ("pythia", "gptneox"), "gptneo": ("gptneo",), "opt": ("opt",)}


def same_family(sae_model_name: str, architecture: str | None) -> bool:
    """True when the recorded model name names the Hugging Face `architecture`'s family: the
    architecture without its head suffix ("Qwen3ForCausalLM" -> "qwen3"), or one of its
    `FAMILY_ALIASES`, appears in the name with punctuation removed ("Qwen/Qwen3-0.6B" -> "qwenqwen306b")."""
    if not architecture:
        return False
    family = re.sub(r"[^a-z0-9]", "", _ARCH_SUFFIXES.sub("", architecture).lower())
    if len(family) < 3:
        return False
    name = re.sub(r"[^a-z0-9]", "", sae_model_name.lower())
    return any(alias in name for alias in FAMILY_ALIASES.get(family, (family,)))


def _name_forms(name: str | None) -> set[str]:
    """Lower-cased name, its last path part, and the same for its TransformerLens official name."""
    if not name:
        return set()
    forms = {name.lower(), name.rstrip("/").split("/")[-1].lower()}
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        official = get_official_model_name(name)
        forms |= {official.lower(), official.split("/")[-1].lower()}
    except (ValueError, ImportError):
        pass
    return forms


def _check_head_index(head_index: int | None, hooked: Any, hook: str, source: str) -> None:
    if head_index is None:
        return
    n_heads = int(hooked.cfg.n_heads)
    if not 0 <= head_index < n_heads:
        raise InputError(
            f"SAE {source} reads head {head_index} of {hook}, but the model has {n_heads} heads; give the matching model."
        )


def _stop_layer(hooked: Any, hook: str) -> int | None:
    """Smallest stop_at_layer that still runs `hook` (None: run the whole model)."""
    match = _LAYER_IN_HOOK.match(hook)
    if match:
        layer = int(match.group(1)) + 1
        return layer if layer < int(hooked.cfg.n_layers) else None
    if hook in _EMBED_HOOKS:
        return 0
    return None


def _device(hooked: Any) -> torch.device:
    try:
        return next(hooked.parameters()).device
    except StopIteration:
        return torch.device("cpu")
