"""Checks that run before the expensive steps (model load, pass) and leave nothing behind.

`check_out_dir` answers "can this output directory be created and written?" without creating it:
it finds the nearest existing ancestor and creates (then removes) one temporary directory in it,
which works for root too (where permission bits say nothing) and on read-only file systems.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sae_mlops.errors import InputError

NAME_MAX = 255  # bytes per path component on Linux and macOS file systems


def out_dir_problem(path: Path | str) -> str | None:
    """Why `path` cannot be used as an output directory (None: it can). Creates nothing that stays."""
    p = Path(path).expanduser()
    for part in p.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            return f"a path component is longer than {NAME_MAX} bytes"
    if p.exists() and not p.is_dir():
        return f"{p} is an existing file, not a directory"
    existing = p
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            return f"{existing} is a broken symbolic link"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        tempfile.TemporaryDirectory(prefix=".sae-mlops-probe-", dir=existing).cleanup()
    except OSError as e:
        return f"{(e.strerror or type(e).__name__).lower()} in {existing}"
    return None


def check_out_dir(path: Path | str, option: str = "--out") -> None:
    """`InputError` (one sentence naming `option`, the path and the fix) unless `path` is an existing
    writable directory or can be created as one."""
    problem = out_dir_problem(path)
    if problem:
        raise InputError(f"{option} {path} cannot be created or written ({problem}); choose another {option}.")
