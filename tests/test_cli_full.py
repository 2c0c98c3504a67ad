"""`sae-mlops full` and `sae-mlops db query`.

One full analysis of the demo BatchTopK SAE (5,000 tokens, untracked) runs once per module through
the `full` command; the `db query` tests then ask its activation database each question and check
the answers against the Parquet files read directly with pandas.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import typer.main
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.config import AnalysisConfig
from sae_mlops.errors import InputError
from sae_mlops.analyses.full import FullOptions
from sae_mlops.options import option_specs

runner = CliRunner()
MAX_TOKENS = 5000

FULL_ONLY = [s.flag for s in option_specs(FullOptions)]  # the declared full-only options


def _options(command: str) -> set[str]:
    cmd = typer.main.get_command(app).commands[command]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


# --- full: options ----------------------------------------------------------------------------


def test_full_help_lists_quick_and_full_options():
    r = runner.invoke(app, ["full", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    quick_opts = _options("quick")
    assert len(quick_opts) > 20
    for opt in sorted(quick_opts | set(FULL_ONLY)):
        assert opt in r.output, opt
    assert _options("full") == quick_opts | set(FULL_ONLY)
    assert "correlation|jaccard|pmi" in r.output
    assert "analysis/<sae dir name>/full_<UTC timestamp>" in r.output
    for default in ("[default: 1000000; x>=1]", "[default: 25; x>=1]", "[default: 10; x>=0]", "[default: 4096; x>=0]",
                    "[default: 32; x>=1]", "[default: 200; x>=2]"):
        assert default in r.output, default


def test_cooccurrence_choices_are_the_measures():
    from sae_mlops.core.collectors.cooccurrence import MEASURES
    from sae_mlops.config import FullOptions
    from sae_mlops.options import option_specs

    (spec,) = [s for s in option_specs(FullOptions) if s.name == "cooccurrence"]
    assert spec.choices == MEASURES


def test_full_options_reach_config_and_full_options(monkeypatch, tmp_path):
    import sae_mlops.analyses.full

    seen = {}

    def boom(cfg, out_dir, opts=None, **kwargs):
        seen.update(cfg=cfg, out=out_dir, opts=opts)
        raise InputError("the SAE directory 's' does not exist;\n pass --sae with an existing directory.")

    monkeypatch.setattr(sae_mlops.analyses.full, "run_full", boom)
    args = [
        "full", "--sae", "s", "--model", "demo", "--hook", "blocks.0.hook_resid_post", "--max-tokens", "500",
        "--batch-size", "4", "--no-prepend-bos", "--topk-mode", "threshold", "--threshold", "0.5", "--device", "cpu",
        "--examples-per-feature", "7", "--context-window", "3", "--cooccurrence", "PMI", "--dense-limit", "100",
        "--neighbours", "5", "--logit-lens-tokens", "4", "--heatmap-features", "50", "--out", str(tmp_path / "o"),
        "--no-track", "--quiet",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pass --sae with an existing directory" in lines[0], r.stderr
    assert seen["cfg"] == AnalysisConfig(
        sae="s", model="demo", hook="blocks.0.hook_resid_post", max_tokens=500, batch_size=4, prepend_bos=False,
        topk_mode="threshold", threshold=0.5, device="cpu", progress=False,
    )
    assert seen["opts"] == FullOptions(
        examples_per_feature=7, context_window=3, cooccurrence_measure="pmi", dense_limit=100, neighbours=5,
        logit_lens_tokens=4, heatmap_features=50,
    )
    assert Path(seen["out"]) == tmp_path / "o"

    runner.invoke(app, ["full", "--sae", "s", "--no-track"])
    assert seen["opts"] == FullOptions()
    assert seen["cfg"] == AnalysisConfig(sae="s")
    assert Path(seen["out"]).name.startswith("full_") and Path(seen["out"]).parent.name == "s"


# --- full: a real run, and its database -------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from sae_mlops.demo import demo_sae_path, ensure_demo_assets

    ensure_demo_assets()
    out = tmp_path_factory.mktemp("full") / "out"
    r = runner.invoke(
        app,
        ["full", "--sae", str(demo_sae_path("batchtopk")), "--model", "demo", "--max-tokens", str(MAX_TOKENS),
         "--out", str(out), "--no-track", "--quiet", "--dashboards", "3"],
        terminal_width=250,
    )
    assert r.exit_code == 0, r.output
    (db,) = (out / "activation_database").iterdir()
    manifest = json.loads((db / "manifest.json").read_text())
    tokens = pd.read_parquet(db / "tokens")
    acts = pd.read_parquet(db / "activations")
    return {"out": out, "db": db, "stdout": r.stdout, "manifest": manifest, "tokens": tokens, "acts": acts}


def _query(*args: str):
    return runner.invoke(app, ["db", "query", *args], terminal_width=250)


def _json(r) -> pd.DataFrame:
    assert r.exit_code == 0, r.output
    return pd.DataFrame(json.loads(r.stdout))


def _csv(r) -> pd.DataFrame:
    assert r.exit_code == 0, r.output
    return pd.read_csv(io.StringIO(r.stdout), keep_default_na=False)


def test_full_shows_headline_and_where_things_are(full_run):
    out, stdout = full_run["out"], full_run["stdout"]
    assert "L0 mean (active features per token)" in stdout and "loss recovered" in stdout
    (summary,) = out.glob("SUMMARY.json")
    (readme,) = out.glob("README.md")
    for path in (summary, readme, full_run["db"]):
        assert str(path) in stdout
    assert f"sae-mlops db query {out}" in stdout
    assert full_run["manifest"]["n_tokens"] == MAX_TOKENS


def test_top_activations_of_a_feature(full_run):
    acts, tokens = full_run["acts"], full_run["tokens"]
    feature = int(acts.feature.value_counts().idxmax())
    got = _json(_query(str(full_run["out"]), "--feature", str(feature), "--top", "7", "--context", "4", "--format", "json"))
    expected = acts[acts.feature == feature].sort_values(["value", "token_index"], ascending=[False, True]).head(7)
    assert got.token_index.tolist() == expected.token_index.tolist()
    assert got.value.tolist() == pytest.approx(expected.value.tolist())
    assert got.value.is_monotonic_decreasing
    assert all("[[" in c and "]]" in c for c in got.context)
    for row in got.itertuples():
        assert f"[[{row.token}]]" in row.context
        t = tokens[tokens.token_index == row.token_index].iloc[0]
        assert (row.doc_index, row.position) == (t.doc_index, t.position)

    r = _query(str(full_run["db"]), "--feature", str(feature))  # the database dir itself; table
    assert r.exit_code == 0, r.output
    assert f"Top 20 activations of feature {feature}" in r.stdout and "[[" in r.stdout
    assert str(full_run["db"]) in r.stdout


def test_features_on_a_token(full_run):
    acts, tokens = full_run["acts"], full_run["tokens"]
    t = tokens.iloc[len(tokens) // 2]
    expected = acts[acts.token_index == t.token_index].sort_values("value", ascending=False)
    assert len(expected) > 0
    by_index = _json(_query(str(full_run["out"]), "--token", str(int(t.token_index)), "--format", "json", "--limit", "0"))
    assert sorted(by_index.feature) == sorted(expected.feature)
    assert by_index.set_index("feature").value.to_dict() == pytest.approx(expected.set_index("feature").value.to_dict())
    by_pos = _json(_query(str(full_run["out"]), "--doc", str(int(t.doc_index)), "--position", str(int(t.position)), "--format", "json", "--limit", "0"))
    assert by_pos.to_dict("records") == by_index.to_dict("records")


def test_features_in_a_document(full_run):
    acts, tokens = full_run["acts"], full_run["tokens"]
    doc = int(tokens.doc_index.value_counts().idxmax())
    merged = acts.merge(tokens, on="token_index")
    expected = merged[merged.doc_index == doc].groupby("feature").value.agg(["count", "max"])
    got = _csv(_query(str(full_run["out"]), "--doc", str(doc), "--format", "csv", "--limit", "0")).set_index("feature")
    assert set(got.index) == set(expected.index)
    assert got.n_tokens.to_dict() == expected["count"].to_dict()
    assert got.max_value.to_numpy() == pytest.approx(expected.loc[got.index, "max"].to_numpy(), rel=1e-5)
    assert got.n_tokens.is_monotonic_decreasing


def test_firing_counts_per_document(full_run):
    acts, tokens = full_run["acts"], full_run["tokens"]
    feature = int(acts.feature.value_counts().idxmax())
    merged = acts[acts.feature == feature].merge(tokens, on="token_index")
    expected = merged.groupby("doc_index").size().to_dict()
    got = _csv(_query(str(full_run["out"]), "--feature-docs", str(feature), "--format", "csv", "--limit", "0"))
    assert dict(zip(got.doc_index, got.n_fired, strict=True)) == expected
    shown = _csv(_query(str(full_run["out"]), "--feature-docs", str(feature), "--format", "csv", "--limit", "3"))
    assert len(shown) == min(3, len(expected))


def test_sql(full_run):
    got = _json(_query(str(full_run["out"]), "--sql", "SELECT count(*) AS n, count(DISTINCT token_index) AS t FROM activations", "--format", "json"))
    assert got.n[0] == full_run["manifest"]["nnz"] == len(full_run["acts"])
    assert got.t[0] == full_run["acts"].token_index.nunique()
    r = _query(str(full_run["out"]), "--sql", "SELECT feature, firing_count FROM features ORDER BY feature", "--limit", "5")
    assert r.exit_code == 0, r.output
    assert "firing_count" in r.stdout and "Showing 5 of" in r.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "ask one question"),
        (["--feature", "1", "--token", "2"], "one question per call"),
        (["--doc", "1", "--sql", "SELECT 1"], "one question per call"),
        (["--feature", "512"], "out of range"),
        (["--feature-docs", "100000"], "out of range"),
        (["--token", str(MAX_TOKENS)], "out of range"),
        (["--doc", "999999"], "no analysed tokens"),
        (["--doc", "0", "--position", "999999"], "no analysed token at position"),
        (["--position", "3"], "--position goes with --doc"),
        (["--token", "1", "--top", "3"], "--top goes with --feature"),
        (["--feature", "-1"], "0 or more"),
        (["--sql", "SELEC nothing"], "does not parse"),
    ],
)
def test_bad_questions_are_one_line_exit_2(full_run, args, words):
    r = _query(str(full_run["out"]), *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], r.stderr
    assert "Traceback" not in r.output and r.stdout == ""


def test_missing_or_empty_path_is_one_line_exit_2(tmp_path):
    for path, words in ((tmp_path / "nope", "does not exist"), (tmp_path, "no activation database")):
        r = _query(str(path), "--feature", "0")
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and words in lines[0], r.stderr


def test_full_writes_dashboards_when_asked(full_run):
    """--dashboards N: the N most frequent features get pages (and the index) under dashboard/, and the
    results JSON records the option and the page timing."""
    out = full_run["out"]
    stats = pd.read_parquet(out / "results" / "feature_stats.parquet").sort_values(["firing_count", "feature"], ascending=[False, True])
    pages = sorted(p.name for p in (out / "dashboard").glob("feature_*.html"))
    assert len(pages) == 3 and (out / "dashboard" / "index.html").is_file()
    assert {f"feature_{int(f)}.html" for f in stats["feature"].head(3)} == set(pages)
    results = json.loads((out / "results" / "analysis_results.json").read_text())
    assert results["params"]["full_dashboards"] == 3
