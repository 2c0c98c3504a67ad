"""Device and dtype names as the user gives them."""

from __future__ import annotations

import torch

from sae_mlops.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(device: str | None) -> str:
    """ "auto" (or None) -> "cuda" when available, else "mps" when available, else "cpu"; others
    unchanged after `check_device`."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    check_device(device)
    return device


def check_device(device: str) -> None:
    """`InputError` unless `device` names a torch device that exists on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a torch device; use --device auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r} is not available: torch sees no CUDA GPU here; use --device cpu (or auto).")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {device!r} does not exist: torch sees {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}); pick one of them.")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"device {device!r} is not available on this machine; use --device cpu (or auto).")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("float32", "bfloat16", "fp16"...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise InputError(f"dtype {dtype!r} is not supported; use one of float32, float16, bfloat16, float64.") from None


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32 etc."""
    return str(dtype).removeprefix("torch.")
