"""Load an SAE exported by the prior tool: ``config.json`` + ``weights.pt`` (+ ``history.json``).

A standard SAE (``top_k`` null) becomes a SAELens ``StandardSAE`` (same math:
``relu((x - b_dec) @ W_enc + b_enc)``, checked numerically at load time); a BatchTopK SAE becomes a
:class:`LegacyBatchTopKSAE`. Weights are read with ``torch.load(..., weights_only=True)`` only, so a
file from someone else cannot run code.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from sae_mlops.errors import InputError
from sae_mlops.sources.device import dtype_name, resolve_dtype
from sae_mlops.sources.legacy_batchtopk import BATCH, THRESHOLD, TOPK_MODES, LegacyBatchTopKSAE
from sae_mlops.sources.types import LoadedSAE, SAEInfo

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
HISTORY_FILE = "history.json"
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
_LAYER_IN_HOOK = re.compile(r"^blocks\.(\d+)\.")


def load_legacy_sae(
    directory: str | Path,
    device: str = "cpu",
    topk_mode: str | None = None,
    threshold: float | None = None,
    source: str | None = None,
) -> LoadedSAE:
    """Load the prior tool's SAE directory.

    topk_mode: for BatchTopK SAEs, "batch" (default) or "threshold"; `InputError` for a standard SAE.
    threshold: for threshold mode only, stored as given (None: the engine estimates it); `InputError`
        in batch mode or for a standard SAE (an option that does not apply is refused, not ignored).
    source: what the user named (defaults to the directory).
    """
    path = Path(directory)
    label = source or str(directory)
    if not path.is_dir():
        raise InputError(f"SAE directory {label} does not exist; give a prior-format or SAELens SAE directory.")
    config = read_legacy_config(path, label)
    d_in, d_sae = _dims(config, label)
    weights = _read_weights(path, label, device)
    _check_weights(weights, d_in, d_sae, label)
    dtype = resolve_dtype(config.get("dtype") or "float32")
    tensors = {key: weights[key].to(device=device, dtype=dtype) for key in WEIGHT_KEYS}
    hook_name, hook_layer = _hook(config, label)

    top_k = config.get("top_k")
    if top_k is None:
        if topk_mode is not None or threshold is not None:
            raise InputError(
                f"SAE {label} is a standard SAE, so {_topk_options(topk_mode, threshold)} does not apply; "
                "drop it (it is for prior-format BatchTopK SAEs only)."
            )
        module: Any = _standard_sae(tensors, config, hook_name, device, dtype)
        architecture, mode, theta, k = "standard", None, None, None
    else:
        mode = topk_mode or BATCH
        if mode not in TOPK_MODES:
            raise InputError(f"topk_mode {mode!r} is not known; use one of {', '.join(TOPK_MODES)} for SAE {label}.")
        try:
            k = int(top_k)
        except (TypeError, ValueError):
            raise InputError(f"SAE {label}: config.json top_k={top_k!r} is not an integer; fix config.json.") from None
        if k < 1:
            raise InputError(f"SAE {label}: config.json top_k={k} must be at least 1; fix config.json.")
        if threshold is not None and mode != THRESHOLD:
            raise InputError(
                f"--threshold applies only with --topk-mode threshold, but SAE {label} runs in {mode} mode; "
                "add --topk-mode threshold or drop --threshold."
            )
        theta = None if threshold is None else float(threshold)
        module = LegacyBatchTopKSAE(**tensors, k=k, mode=mode, threshold=theta).eval()
        architecture = "batchtopk"

    info = SAEInfo(
        source=label,
        format="legacy",
        architecture=architecture,
        hook_name=hook_name,
        d_in=d_in,
        d_sae=d_sae,
        hook_layer=hook_layer,
        model_name=_model_name(config, path, hook_name),
        prepend_bos=_optional_bool(config.get("prepend_bos")),
        context_size=_optional_int(config.get("context_size")),
        dtype=dtype_name(dtype),
        k=k,
        topk_mode=mode,
        threshold=theta,
        ever_fired=_ever_fired(weights, d_sae, label),
        history=read_history(path, label),
        local_path=path.resolve(),
        extra={"legacy_config": config},
    )
    if config.get("model_name") is None and info.model_name is not None:
        info.extra["model_name_from"] = "directory name"
    return LoadedSAE(module=module, info=info)


def read_legacy_config(path: Path, label: str) -> dict[str, Any]:
    """config.json of a prior-format SAE directory, as a dict."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(
            f"SAE directory {label} has no {CONFIG_FILE}; give a prior-format SAE directory (config.json + weights.pt)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(
            f"SAE directory {label}: {CONFIG_FILE} is not valid JSON ({exc}); fix or re-export it."
        ) from None
    if not isinstance(config, dict):
        raise InputError(f"SAE directory {label}: {CONFIG_FILE} is not a JSON object; fix or re-export it.")
    return config


def read_history(path: Path, label: str) -> dict[str, list[float]] | None:
    """history.json (a dict of per-epoch lists) when present and readable, else None (logged)."""
    history_path = path / HISTORY_FILE
    if not history_path.is_file():
        return None
    try:
        history = json.loads(history_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("SAE %s: %s is not valid JSON (%s); training history ignored", label, HISTORY_FILE, exc)
        return None
    if not isinstance(history, dict):
        logger.warning("SAE %s: %s is not a JSON object; training history ignored", label, HISTORY_FILE)
        return None
    return {str(key): list(value) for key, value in history.items() if isinstance(value, list)}


def _dims(config: dict[str, Any], label: str) -> tuple[int, int]:
    try:
        return int(config["d_in"]), int(config["d_sae"])
    except KeyError as exc:
        raise InputError(
            f"SAE directory {label}: config.json has no {exc.args[0]!r}; fix or re-export config.json."
        ) from None
    except (TypeError, ValueError):
        raise InputError(f"SAE directory {label}: config.json d_in/d_sae are not integers; fix config.json.") from None


def _read_weights(path: Path, label: str, device: str) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InputError(
            f"SAE directory {label} has no {WEIGHTS_FILE}; give a prior-format SAE directory (config.json + weights.pt)."
        )
    try:
        state = torch.load(weights_path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"SAE directory {label}: {WEIGHTS_FILE} cannot be loaded safely with weights_only=True ({first_line}); "
            "re-save it as a plain state_dict of tensors."
        ) from None
    if not isinstance(state, dict):
        raise InputError(
            f"SAE directory {label}: {WEIGHTS_FILE} holds a {type(state).__name__}, not a state_dict; re-save it as a state_dict."
        )
    return state


def _check_weights(weights: dict[str, Any], d_in: int, d_sae: int, label: str) -> None:
    missing = [key for key in WEIGHT_KEYS if key not in weights]
    if missing:
        raise InputError(
            f"SAE directory {label}: {WEIGHTS_FILE} lacks {', '.join(missing)} (has {', '.join(sorted(map(str, weights))[:8])}); "
            "give the prior tool's exported weights."
        )
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for key, shape in expected.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(
                f"SAE directory {label}: {key} has shape {got}, expected {shape} from config.json "
                f"(d_in={d_in}, d_sae={d_sae}); make config.json and weights.pt match."
            )
    from sae_mlops.sources.finite import check_finite_tensors

    check_finite_tensors(weights, d_sae, f"directory {label}")


def _hook(config: dict[str, Any], label: str) -> tuple[str, int | None]:
    """(full hook name, layer): hook_spec if given, else blocks.{hook_layer}.{hook_name}."""
    layer = _optional_int(config.get("hook_layer"))
    spec = config.get("hook_spec")
    if spec:
        hook = str(spec)
    elif config.get("hook_name") and config.get("hook_layer") is not None:
        hook = f"blocks.{config['hook_layer']}.{config['hook_name']}"
    elif config.get("hook_name") and str(config["hook_name"]).count("."):
        hook = str(config["hook_name"])
    else:
        raise InputError(
            f"SAE directory {label}: config.json has neither hook_spec nor hook_layer + hook_name; add them."
        )
    if layer is None:
        match = _LAYER_IN_HOOK.match(hook)
        layer = int(match.group(1)) if match else None
    return hook, layer


def _model_name(config: dict[str, Any], path: Path, hook_name: str) -> str | None:
    """config.json's model_name, else the prefix the prior tool put before the hook in the directory name.

    The prior tool named directories ``<org>_<model>.<hook>.<suffix>``, e.g.
    ``Qwen_Qwen3-0.6B.blocks.9.hook_resid_post.btop128sae.all_science.exp4`` -> ``Qwen/Qwen3-0.6B``.
    """
    if config.get("model_name"):
        return str(config["model_name"])
    marker = f".{hook_name}."
    name = path.resolve().name + "."
    if marker not in name:
        return None
    prefix = name.split(marker, 1)[0]
    if not prefix:
        return None
    return prefix.replace("_", "/", 1) if "_" in prefix and "/" not in prefix else prefix


def _ever_fired(weights: dict[str, Any], d_sae: int, label: str) -> torch.Tensor | None:
    value = weights.get("ever_fired")
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (d_sae,):
        logger.warning("SAE %s: ever_fired has an unexpected shape; ignored", label)
        return None
    return value.detach().to("cpu").bool()


def _standard_sae(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], hook_name: str, device: str, dtype: torch.dtype
) -> Any:
    """A SAELens StandardSAE holding the prior tool's weights, checked against the prior math."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(
        hook_name=hook_name,
        model_name=config.get("model_name"),
        prepend_bos=config.get("prepend_bos"),
        context_size=config.get("context_size"),
    )
    cfg = StandardSAEConfig(
        d_in=tensors["W_enc"].shape[0],
        d_sae=tensors["W_enc"].shape[1],
        dtype=dtype_name(dtype),
        device=device,
        apply_b_dec_to_input=True,
        metadata=metadata,
    )
    sae = StandardSAE(cfg)
    sae.load_state_dict(tensors, strict=True)
    sae.requires_grad_(False)
    sae.eval()
    _check_standard_math(sae, tensors)
    return sae


@torch.no_grad()
def _check_standard_math(sae: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Guard against a SAELens change: its encode must equal relu((x - b_dec) @ W_enc + b_enc)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, tensors["W_enc"].shape[0], generator=generator).to(tensors["W_enc"])
    expected = torch.relu((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    got = sae.encode(x)
    tolerance = 1e-4 if tensors["W_enc"].dtype in (torch.float32, torch.float64) else 1e-2
    scale = float(expected.abs().max()) + 1.0
    if not torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance * scale):
        raise RuntimeError("SAELens StandardSAE.encode no longer matches relu((x - b_dec) @ W_enc + b_enc)")


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _topk_options(topk_mode: str | None, threshold: float | None) -> str:
    """The option(s) given, as the user typed them (for messages)."""
    return " and ".join(o for o, v in (("--topk-mode", topk_mode), ("--threshold", threshold)) if v is not None)
