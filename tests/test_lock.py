"""The locked install: uv.lock agrees with pyproject.toml, requirements-lock.txt is its export, the check can fail.

`make lock` writes both files; `make install` installs uv.lock with `uv sync --frozen`; the MLproject environment,
conda.yaml and the Dockerfile install requirements-lock.txt. `uv lock --check --offline` needs no network: it
compares the lock with the declarations without resolving.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ["export", "--frozen", "--no-emit-project", "--no-dev", "--no-hashes", "--no-header", "--quiet"]


def _uv(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # uv is in the dev extra (pinned like the Makefile's bootstrap); `python -m uv` runs its binary.
    return subprocess.run([sys.executable, "-m", "uv", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_lock_matches_pyproject():
    res = _uv("lock", "--check", "--offline")
    assert res.returncode == 0, res.stderr


def test_the_check_fails_when_pyproject_drifts(tmp_path):
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "sae_mlops").mkdir()
    assert _uv("lock", "--check", "--offline", cwd=tmp_path).returncode == 0  # the copy alone is consistent
    pyproject = (tmp_path / "pyproject.toml").read_text()
    assert '    "rich",\n' in pyproject
    # a dependency removed: uv re-resolves (from PyPI, as `make check` does) and finds the lock out of date
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('    "rich",\n', "", 1))
    res = _uv("lock", "--check", cwd=tmp_path)
    assert res.returncode != 0 and "needs to be updated" in res.stderr, res.stderr
    # the project's own metadata changed: detected without the network
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('version = "0.1.0"', 'version = "0.1.1"', 1))
    res = _uv("lock", "--check", "--offline", cwd=tmp_path)
    assert res.returncode != 0 and "needs to be updated" in res.stderr, res.stderr


def test_requirements_lock_is_the_export_of_uv_lock():
    res = _uv(*EXPORT)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (ROOT / "requirements-lock.txt").read_text(), "requirements-lock.txt is stale: run make lock"


def _locked_versions() -> dict[str, str]:
    text = (ROOT / "uv.lock").read_text()
    return dict(re.findall(r'^\[\[package\]\]\nname = "([^"]+)"\nversion = "([^"]+)"', text, re.M))


def test_every_transitive_package_is_pinned_and_torch_is_the_cpu_build():
    locked = _locked_versions()
    assert locked["torch"] == "2.13.0+cpu"
    assert not any(name.startswith("nvidia-") for name in locked)  # no CUDA runtime pulled in
    exported = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", (ROOT / "requirements-lock.txt").read_text(), re.M))
    assert len(exported) > 150  # every transitive runtime package, not only the direct ones
    assert all(locked[name] == version for name, version in exported.items())
    # the uv that `make` bootstraps is the one the dev extra pins
    make_uv = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert make_uv and f'"uv=={make_uv.group(1)}"' in (ROOT / "pyproject.toml").read_text()
    assert locked["uv"] == make_uv.group(1)


def test_the_install_holds_compiled_bytecode():
    """`make install` compiles the installed packages (`uv sync --compile-bytecode`): uv writes no .pyc
    files by default, and where PYTHONDONTWRITEBYTECODE is set Python never writes them either, so every
    process would compile torch, transformers and TransformerLens from source (a demo quick analysis
    took 11.4 s instead of 4.6 s)."""
    import importlib.util

    for name in ("torch", "transformers", "transformer_lens", "sae_lens"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        assert Path(importlib.util.cache_from_source(spec.origin)).is_file(), f"{name} was installed without bytecode"
