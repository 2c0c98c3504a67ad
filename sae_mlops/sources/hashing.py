"""Content digests: of a file, of a directory's files, of a state dict."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the bytes of `path`, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_directory(directory: Path) -> str:
    """Hex sha256 over every regular file under `directory` (recursively, hidden files skipped).

    Files are taken in sorted order of their relative POSIX paths; each contributes its relative path
    and its bytes, so renaming a file changes the digest as well as editing it.
    """
    digest = hashlib.sha256()
    files = sorted(
        (
            p
            for p in directory.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        ),
        key=lambda p: p.relative_to(directory).as_posix(),
    )
    for path in files:
        digest.update(path.relative_to(directory).as_posix().encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over the tensors of `state_dict` (sorted by name: name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
