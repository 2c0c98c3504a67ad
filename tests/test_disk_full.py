"""A full disk while the activation database is written (ENOSPC injected at the writer: a tmpfs
small enough to fill exactly there cannot be sized reliably): one sentence, exit 2, no traceback,
the checkpoint intact; the same command again resumes from it and writes the complete outputs."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.demo import demo_sae_path, ensure_demo_assets

runner = CliRunner()


def test_disk_full_while_writing_the_database_keeps_a_resumable_checkpoint(tmp_path, monkeypatch):
    from sae_mlops.outputs.activation_db import writer

    ensure_demo_assets()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "full"
    argv = ["full", "--sae", str(demo_sae_path("batchtopk")), "--model", "demo", "--no-track", "-q",
            "--max-tokens", "6000", "--batch-size", "2", "--shard-tokens", "1", "--out", str(out)]

    def full_disk(partial: Path, n_tokens: int, nnz: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(partial / "csr" / "data.npy"))

    monkeypatch.setattr(writer, "_write_csr", full_disk)
    r = runner.invoke(app, argv, terminal_width=400)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    assert f"the disk holding {out} is full (No space left on device while writing data.npy" in errors[0]
    assert "checkpoint" in errors[0] and "is intact" in errors[0] and f"--resume {out}" in errors[0]
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    done = len(manifest["done"])
    assert done >= 1 and f"({done} finished shard(s)) is intact" in errors[0]

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, argv, terminal_width=400)
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results" / "analysis_results.json").read_text())
    assert results["params"]["shards_resumed"] == done  # the finished shards were not recomputed
    db = json.loads((out / "activation_database" / "activation_db" / "manifest.json").read_text())
    assert db["n_tokens"] == results["metrics"]["tokens/analysed"]
    assert not (out / "checkpoint").exists()
