"""scripts/ui_snapshots.py takes the relative ``--sae-python`` its docstring documents: the servers and
commands it starts run in the store's folder, so relative paths are made absolute first."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("ui_snapshots_args", ROOT / "scripts" / "ui_snapshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_relative_sae_python_runs_from_the_store_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    relative = os.path.relpath(sys.executable, ROOT)  # e.g. .venv/bin/python, as documented
    args = _script().parse_args(["--sae-python", relative, "--out", "shots", "--store", "kept"])
    assert os.path.isabs(args.sae_python) and args.out == ROOT / "shots" and args.store == ROOT / "kept"
    done = subprocess.run([args.sae_python, "-c", "import sys; print(sys.prefix)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == sys.prefix  # the venv itself, its symlink kept
    assert _script().parse_args(["--sae-python", "python3"]).sae_python == "python3"  # a command on PATH stays
