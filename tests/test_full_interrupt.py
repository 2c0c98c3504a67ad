"""An interrupted full analysis leaves no file that looks complete."""

from __future__ import annotations

import pytest

from sae_mlops.outputs.activation_db.reader import ActivationDB
from sae_mlops.config import AnalysisConfig
from sae_mlops.demo import demo_sae_path
from sae_mlops.core.engine import Engine
from sae_mlops.errors import InputError
from sae_mlops.analyses.full import FullOptions, run_full


def test_interrupt_mid_pass_leaves_nothing_complete(tmp_path, monkeypatch):
    real_step = Engine.step
    calls = {"n": 0}

    def flaky_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Engine, "step", flaky_step)
    cfg = AnalysisConfig(sae=str(demo_sae_path("standard")), model="demo", max_tokens=4000, batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_full(cfg, tmp_path, FullOptions(shard_rows=50))
    leftovers = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    # only the checkpoint: its manifest (no shard finished) and the unfinished shard's staging parts
    assert leftovers and all(p.parts[0] == "checkpoint" for p in leftovers)
    import json

    manifest = json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())
    assert manifest["done"] == {}
    assert not any(p.parts[1].startswith("shard-") and ".tmp-" not in p.parts[1] for p in leftovers if len(p.parts) > 2)
    with pytest.raises(InputError):
        ActivationDB(tmp_path)


def test_interrupt_while_writing_reports_leaves_no_summary(tmp_path, monkeypatch):
    import sae_mlops.outputs.full_reports as writers

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writers, "summary_dict", boom)
    cfg = AnalysisConfig(sae=str(demo_sae_path("standard")), model="demo", max_tokens=2000, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_full(cfg, tmp_path, FullOptions())
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(n.startswith(("SUMMARY", "README")) for n in names)
    assert not any(n.endswith(".part") for n in names)
    ActivationDB(tmp_path)  # the database itself was finished before the interrupt: complete and readable
