"""Load SAELens SAEs: a local directory (cfg.json + sae_weights.safetensors) or a release + SAE id.

Every inference architecture SAELens 6.x registers loads (standard, topk, jumprelu — which is also how
SAELens stores trained BatchTopK and Matryoshka SAEs — gated, ...). Transcoders are refused: they
reconstruct a different hook than they read, which the reconstruction and ablation metrics do not
handle.

Hook-z SAEs: SAELens reshapes ``[..., n_heads, d_head]`` inputs itself; the engine hands every SAE
flattened ``[n_tokens, d_in]`` rows, so that reshaping is switched off and ``info.extra["hook_z"]``
is set to tell the engine to flatten the head dimensions.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

from sae_mlops.errors import InputError
from sae_mlops.sources.hub import hub_errors, hub_offline_unless_reachable
from sae_mlops.sources.types import LoadedSAE, SAEInfo

logger = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_LAYER_IN_HOOK = re.compile(r"^blocks\.(\d+)\.")
_HUB_ERRORS_HINT = "give a local SAELens directory (cfg.json + sae_weights.safetensors) instead"


def load_saelens_dir(directory: str | Path, device: str = "cpu", source: str | None = None) -> LoadedSAE:
    """Load a SAELens SAE directory with ``SAE.load_from_disk``."""
    from sae_lens import SAE

    path = Path(directory)
    label = source or str(directory)
    _check_saelens_dir(path, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sae = SAE.load_from_disk(path, device=device)
    except InputError:
        raise
    except KeyError as exc:
        raise InputError(
            f"SAE directory {label}: cfg.json lacks or names an unknown {exc}; {_architectures_hint()}."
        ) from None
    except (RuntimeError, ValueError, TypeError, OSError) as exc:
        raise InputError(
            f"SAE directory {label} could not be loaded by SAELens ({_first_line(exc)}); check cfg.json and the weights."
        ) from None
    info = saelens_info(sae, source=label, fmt="saelens")
    info.local_path = path.resolve()
    return LoadedSAE(module=_prepare(sae, info), info=info)


def load_saelens_release(release: str, sae_id: str, device: str = "cpu", source: str | None = None) -> LoadedSAE:
    """Load ``release`` / ``sae_id`` with ``SAE.from_pretrained`` (the Hugging Face hub or its local cache).

    Unknown releases and ids fail before any download; without network the hub is not retried and
    the failure says so.
    """
    from sae_lens import SAE

    label = source or f"{release}:{sae_id}"
    check_release(release, sae_id)
    online = False
    try:
        with hub_offline_unless_reachable() as online, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sae = SAE.from_pretrained(release, sae_id, device=device)
    except InputError:
        raise
    except hub_errors() as exc:
        reason = "no network or hub unreachable" if not online else _first_line(exc)
        raise InputError(
            f"SAELens release {release} (SAE id {sae_id}) could not be downloaded from the Hugging Face hub ({reason}); "
            f"{_HUB_ERRORS_HINT}."
        ) from None
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InputError(
            f"SAELens release {release} (SAE id {sae_id}) could not be loaded ({_first_line(exc)}); {_HUB_ERRORS_HINT}."
        ) from None
    info = saelens_info(sae, source=label, fmt="saelens-release")
    info.extra.update({"release": release, "sae_id": sae_id})
    return LoadedSAE(module=_prepare(sae, info), info=info)


def check_release(release: str, sae_id: str) -> None:
    """InputError unless `release` is a known SAELens release holding `sae_id` (or a hub repo id "org/name")."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        if "/" in release:
            return  # SAELens also accepts a Hugging Face repo id holding SAELens-format folders
        close = difflib.get_close_matches(release, list(directory), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(
            f"SAELens release {release!r} is not known{hint}; give a release from SAELens' pretrained_saes.yaml, "
            "a local SAE directory, or a runs:/ or models:/ URI."
        )
    ids = list(directory[release].saes_map)
    if sae_id not in ids:
        close = difflib.get_close_matches(sae_id, ids, n=3) or ids[:3]
        raise InputError(
            f"SAE id {sae_id!r} is not in SAELens release {release}; valid ids include {', '.join(close)}."
        )


def saelens_info(sae: Any, source: str, fmt: str) -> SAEInfo:
    """SAEInfo from a loaded SAELens SAE's config and metadata."""
    cfg = sae.cfg
    meta = cfg.metadata
    hook_name = meta.hook_name
    if not hook_name:
        raise InputError(f"SAE {source} records no hook_name in its metadata; add metadata.hook_name to cfg.json.")
    match = _LAYER_IN_HOOK.match(hook_name)
    extra: dict[str, Any] = {
        "saelens_version": meta.sae_lens_version,
        "training_architecture": meta.training_architecture,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.reshape_activations,
        "hook_z": cfg.reshape_activations == "hook_z",
    }
    if meta.model_from_pretrained_kwargs:
        extra["model_from_pretrained_kwargs"] = dict(meta.model_from_pretrained_kwargs)
    if meta.neuronpedia_id:
        extra["neuronpedia_id"] = meta.neuronpedia_id
    if getattr(cfg, "k", None) is not None:
        extra["k"] = int(cfg.k)
    return SAEInfo(
        source=source,
        format=fmt,
        architecture=cfg.architecture(),
        hook_name=hook_name,
        d_in=int(cfg.d_in),
        d_sae=int(cfg.d_sae),
        hook_layer=int(match.group(1)) if match else None,
        hook_head_index=meta.hook_head_index,
        model_name=meta.model_name,
        prepend_bos=meta.prepend_bos,
        context_size=meta.context_size,
        dtype=str(cfg.dtype),
        extra={key: value for key, value in extra.items() if value is not None},
    )


def _prepare(sae: Any, info: SAEInfo) -> Any:
    """Refuse transcoders; switch off hook-z reshaping (rows arrive flattened); inference mode."""
    if "transcoder" in info.architecture:
        raise InputError(
            f"SAE {info.source} is a {info.architecture}, which reconstructs another hook than it reads; "
            "give a sparse autoencoder instead."
        )
    if info.extra.get("hook_z"):
        sae.turn_off_forward_pass_hook_z_reshaping()
    sae.requires_grad_(False)
    sae.eval()
    return sae


def _check_saelens_dir(path: Path, label: str) -> None:
    if not path.is_dir():
        raise InputError(
            f"SAE directory {label} does not exist; give a SAELens directory (cfg.json + sae_weights.safetensors)."
        )
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        raise InputError(
            f"SAE directory {label} has no {CFG_FILE}; give a SAELens directory (cfg.json + sae_weights.safetensors)."
        )
    if not (path / WEIGHTS_FILE).is_file():
        raise InputError(
            f"SAE directory {label} has no {WEIGHTS_FILE}; give a SAELens directory (cfg.json + sae_weights.safetensors)."
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"SAE directory {label}: {CFG_FILE} is not valid JSON ({exc}); fix or re-save it.") from None
    if not isinstance(cfg, dict):
        raise InputError(f"SAE directory {label}: {CFG_FILE} is not a JSON object; fix or re-save it.")
    architecture = cfg.get("architecture", "standard")
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if architecture not in SAE_CLASS_REGISTRY:
        raise InputError(
            f"SAE directory {label}: architecture {architecture!r} is not known to SAELens; {_architectures_hint()}."
        )


def _architectures_hint() -> str:
    from sae_lens.registry import SAE_CLASS_REGISTRY

    return "SAELens knows " + ", ".join(sorted(SAE_CLASS_REGISTRY))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
