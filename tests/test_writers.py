"""Quick-analysis writers: files are complete JSON/Parquet/Markdown and writes are atomic."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from sae_mlops.core.results import AnalysisResult
from sae_mlops.files import umask, atomic_write
from sae_mlops.outputs.summaries import summary_markdown, write_quick_outputs


def _result():
    return AnalysisResult(
        kind="quick",
        params={"sae": "x", "hook": "blocks.0.hook_resid_post", "d_in": 4, "d_sae": 3},
        metrics={"sparsity/l0_mean": 2.5, "downstream/loss_recovered": math.nan, "tokens/analysed": 1000},
        tags={"sae_mlops.kind": "quick"},
        per_feature={"firing_count": [1, 0, 5], "frequency": [0.001, 0.0, 0.005]},
        warnings=["something odd"],
    )


def test_write_quick_outputs(tmp_path):
    files = write_quick_outputs(_result(), tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in files)  # stable names: no timestamp
    assert names == ["SUMMARY.md", "results/analysis_results.json", "results/feature_stats.parquet"]
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask() for p in files)  # not mkstemp's 0600
    data = json.loads(next(p for p in files if p.suffix == ".json").read_text())
    assert data["metrics"]["sparsity/l0_mean"] == 2.5
    assert data["metrics"]["downstream/loss_recovered"] is None  # NaN is not valid JSON
    frame = pd.read_parquet(next(p for p in files if p.suffix == ".parquet"))
    assert frame["feature"].tolist() == [0, 1, 2] and frame["firing_count"].tolist() == [1, 0, 5]
    md = next(p for p in files if p.suffix == ".md").read_text()
    assert "| L0 mean (active features per token) | 2.5 |" in md and "n/a" in md and "something odd" in md
    assert not list(tmp_path.rglob("*.part"))


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    target = tmp_path / "out.json"

    def boom(tmp):
        tmp.write_text('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_summary_lists_topk_mode():
    r = _result()
    r.params.update(topk_mode="threshold", topk_k=16, topk_threshold=0.25)
    assert "mode `threshold`, theta 0.25" in summary_markdown(r)
