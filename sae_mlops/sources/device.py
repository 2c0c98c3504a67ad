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
    """ "auto" (or None) -> "cuda" when available, else "mps" when available, else "cpu"; others unchanged."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    return device


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
