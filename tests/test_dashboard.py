"""Feature dashboards on a demo full analysis: every section of a feature page, the index (sorting
and search hooks, fragment navigation to every page), labels shown when present, the fallback
without an activation database, and logging to the analysis run."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feature_fixtures import shared_demo_full
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.features import dashboard as D


@pytest.fixture(scope="module")
def analysis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_demo_full(tmp_path_factory)


def _stats(root: Path) -> pd.DataFrame:
    return pd.read_parquet(next((root / "results").glob("feature_stats*.parquet"))).sort_values("feature")


def test_choose_features_is_bounded() -> None:
    stats = pd.DataFrame({"feature": range(6), "firing_count": [5, 0, 9, 9, 1, 0]})
    assert D.choose_features(stats, None, 2) == [2, 3]
    assert D.choose_features(stats, [5], 1) == [2, 5]
    with pytest.raises(Exception, match="out of range"):
        D.choose_features(stats, [6], 1)


def test_feature_page_has_every_section(analysis: Path, tmp_path: Path) -> None:
    stats = _stats(analysis)
    top = int(stats.sort_values(["firing_count", "feature"], ascending=[False, True]).feature.iloc[0])
    dead = stats.feature[stats.firing_count == 0].tolist()
    asked = [dead[0]] if dead else []
    out = D.write_dashboards(analysis, tmp_path / "d", features=asked, top=5, context=4)
    assert len(out.pages) == 5 + len(asked) and len(out.seconds_per_page) == len(out.pages)
    page = (tmp_path / "d" / f"feature_{top}.html").read_text()
    for section in ("Activation histogram", "Top activating examples", "Logit lens", "Most similar (decoder cosine)", "Most co-occurring", "Label"):
        assert f"<h2>{section}" in page, section
    assert "<svg" in page and "<rect" in page and "no label yet" in page
    row = stats.set_index("feature").loc[top]
    assert f"fired on {int(row.firing_count):,} of 1,200 tokens" in page
    # the histogram counts every non-zero activation of the feature (from the CSR)
    assert f"activation ({int(row.firing_count):,} non-zero tokens)" in page
    # examples: the activating token boxed, shaded neighbours carry their activation
    summary = next(json.loads(line) for line in next((analysis / "results").glob("feature_summaries*.jsonl")).read_text().splitlines() if json.loads(line)["feature"] == top)
    first = summary["top_examples"][0]
    assert page.count('class="tok hit"') == len(summary["top_examples"])
    assert f'title="{first["activation"]:.3g}"' in page
    lens = pd.read_parquet(next((analysis / "results").glob("logit_lens*.parquet")))
    assert repr(str(lens[(lens.feature == top) & (lens.side == "top")].sort_values("rank").token.iloc[0])) in html.unescape(page)
    # neighbours that have a page are links, the others plain
    assert re.search(r'<a href="feature_\d+\.html">', page) or "none" in page
    if dead:
        assert "never fired" in (tmp_path / "d" / f"feature_{dead[0]}.html").read_text()
    index = out.index.read_text()
    assert 'id="features"' in index and 'id="q"' in index and "<script>" in index
    assert all(f'<section class="feature" id="f{p.stem.split("_")[1]}">' in index for p in out.pages)
    assert f'<a href="#f{top}">{top}</a>' in index
    freq_cells = [float(v) for v in re.findall(r'<td class="num" data-v="([0-9.e+-]+)">[0-9.e+-]+</td><td class="num" data-v="[0-9.e+-]+">', index)]
    assert freq_cells == sorted(freq_cells, reverse=True) and len(freq_cells) == len(out.pages)


def test_labels_appear_and_no_database_fallback(analysis: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(analysis, root, ignore=shutil.ignore_patterns("activation_database"))
    (root / "labels").mkdir()
    feature = int(_stats(root).sort_values("firing_count").feature.iloc[-1])
    rec = {"feature": feature, "label": "dunder method names", "description": "fires on __x__ names", "category": "syntax",
           "monosemantic": True, "interpretability": 4, "detection_balanced_accuracy": 0.75, "model": "test-model"}
    (root / "labels" / "labels.jsonl").write_text(json.dumps(rec) + "\n")
    out = D.write_dashboards(root, features=[feature], top=0)
    assert not out.with_database and out.labelled == 1
    page = (root / "dashboard" / f"feature_{feature}.html").read_text()
    assert "dunder method names" in page and "fires on __x__ names" in page and "0.75" in page
    assert "from the top examples only" in page and "[[" not in page
    index = out.index.read_text()
    assert "dunder method names" in index and 'data-v="4"' in index


def test_dashboard_cli_logs_to_the_run(analysis: Path, tmp_path: Path, mlflow_store: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("x"))
    r = CliRunner().invoke(app, ["dashboard", str(analysis), "--top", "3", "--features", "0", "--out", str(tmp_path / "d"), "--run-id", run.info.run_id, "-q"])
    assert r.exit_code == 0, r.output
    names = {f.path for f in client.list_artifacts(run.info.run_id, "dashboard")}
    assert "dashboard/index.html" in names and "dashboard/feature_0.html" in names
    got = client.get_run(run.info.run_id).data
    assert got.metrics["dashboard/pages"] == len(names) - 1 and got.metrics["dashboard/seconds_per_page_mean"] > 0
    assert got.tags["sae_mlops.dashboard_index"] == "dashboard/index.html"
    bad = CliRunner().invoke(app, ["dashboard", str(analysis), "--features", "99999", "--no-log"])
    assert bad.exit_code == 2 and "out of range" in bad.output
    assert np.isfinite(got.metrics["dashboard/seconds_total"])
