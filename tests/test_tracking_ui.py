"""What a researcher sees in the MLflow UI, checked through MLflow's API on a real sqlite store:
run and logged-model names, params without 'None', descriptions and their links, registry links both
ways, stable artifact names with mode 0644, plots as images, compare de-duplication and formats,
the progress total and the interrupted-analysis line. (The browser check is scripts/ui_snapshots.py.)"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import mistune
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.config import AnalysisConfig
from sae_mlops.demo import demo_corpus_path, demo_sae_path
from sae_mlops.naming import run_title, sae_name
from sae_mlops.core.results import AnalysisResult

runner = CliRunner()
TOKENS = 600  # a few hundred tokens: enough for every metric, seconds on a CPU


def _quick(sae: str, out: Path, **kw):
    from sae_mlops.workflows import run_quick_and_log

    cfg = AnalysisConfig(sae=sae, model="demo", max_tokens=TOKENS, batch_size=8, progress=False, device="cpu")
    return run_quick_and_log(cfg, out, experiment="ui", **kw)


def test_names():
    assert sae_name("/a/b/topk_512/") == "topk_512"
    assert sae_name("models:/demo-sae@champion") == "demo-sae@champion"
    assert sae_name("models:/demo-sae/3") == "demo-sae/v3"
    assert sae_name("runs:/0123456789abcdef/sae") == "run-01234567/sae"
    assert sae_name("gpt2-small-res-jb", "blocks.8.hook_resid_pre") == "gpt2-small-res-jb/blocks.8.hook_resid_pre"
    assert run_title("quick", "topk_512", "topk", 512, 16) == "quick · topk_512 · topk d512 k16"
    assert run_title("full", "std", "standard", 512.0, None) == "full · std · standard d512"


def test_quick_run_names_params_description_files(mlflow_store, tmp_path):
    """A SAELens TopK SAE (cfg.json has k): explicit name, topk_k filled, no 'None' params, headline
    description, experiment description, stable 0644 files, the run lasting as long as the analysis."""
    outcome = _quick(str(demo_sae_path("saelens")), tmp_path / "q")
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.run_name == "quick · sae_saelens · topk d512 k16"
    p = run.data.params
    assert "None" not in p.values() and "sae_id" not in p and "topk_threshold" not in p
    assert (p["topk_k"], p["d_sae"], p["sae_architecture"], p["sae_name"]) == ("16", "512", "topk", "sae_saelens")
    note = run.data.tags["mlflow.note.content"]
    pm = r"(?: ± [\d.]+)"  # the half-width of the 95 % interval
    assert re.match(rf"\*\*quick analysis\*\* · L0 \*\*[\d.]+\*\*{pm} · loss recovered \*\*[\d.]+\*\*{pm} · "
                    rf"explained variance \*\*[\d.]+\*\*{pm} · dead fraction \*\*[\d.]+\*\*{pm}$", note.splitlines()[0])
    exp_note = client.get_experiment(run.info.experiment_id).tags["mlflow.note.content"]
    assert "sparsity/l0_mean" in exp_note and "downstream/loss_recovered" in exp_note and "scatter" in exp_note
    assert run.data.tags["sae_mlops.finished_at"].endswith("Z")
    # the run spans the analysis (created after it, but started when it started)
    assert (run.info.end_time - run.info.start_time) / 1000 >= run.data.metrics["speed/seconds"]
    # stable names, readable by a shared artifact store
    names = sorted(p.relative_to(outcome.out_dir).as_posix() for p in outcome.out_dir.rglob("*") if p.is_file())
    assert names == ["SUMMARY.md", "results/analysis_results.json", "results/blocks.json", "results/blocks.safetensors",
                     "results/feature_stats.parquet"]
    for f in outcome.out_dir.rglob("*"):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # the summary table renders with four cells per row (metric, value, 95 % interval, unit; no "||" splitting a row)
    html = mistune.create_markdown(plugins=["table"])((outcome.out_dir / "SUMMARY.md").read_text())
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
    assert rows and all(r.count("<td") == 4 for r in rows[1:])
    assert "KL(clean || SAE)" in html and "L2 ratio ||x_hat|| / ||x||" in html


def test_cli_links_and_interrupt_line(mlflow_store, tmp_path, monkeypatch):
    sae = str(demo_sae_path("standard"))
    r = runner.invoke(app, ["quick", "--sae", sae, "--model", "demo", "--max-tokens", str(TOKENS), "--out", str(tmp_path / "a"),
                            "--experiment", "ui", "-q"], terminal_width=300)
    assert r.exit_code == 0, r.output
    exp = MlflowClient().get_experiment_by_name("ui").experiment_id
    assert re.search(rf"http://127\.0\.0\.1:5000/#/experiments/{exp}/runs/[0-9a-f]{{32}}\?workflowType=machine_learning", r.output)
    assert f"/#/experiments/{exp}/runs?workflowType=machine_learning\n" in r.output
    assert f"/#/experiments/{exp}/runs?workflowType=machine_learning&compareRunsMode=CHART" in r.output
    assert "mlflow ui --backend-store-uri" in r.output

    from sae_mlops.core.engine import Engine

    def interrupted(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "step", interrupted)
    r = runner.invoke(app, ["quick", "--sae", sae, "--model", "demo", "--max-tokens", str(TOKENS), "--out", str(tmp_path / "b"), "-q"],
                      terminal_width=300)
    assert r.exit_code == 130
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "quick analysis interrupted: nothing was written to" in lines[0] and "was marked KILLED" in lines[0]


def test_progress_total_is_the_tokens_there(tmp_path):
    from sae_mlops.analyses.quick import available_tokens, prepare, run_pass

    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps(["def add(a, b):\n    return a + b\n", "Return the sum of two numbers, a and b."] * 12))
    cfg = AnalysisConfig(sae=str(demo_sae_path("standard")), model="demo", corpus=str(corpus), max_tokens=1_000_000,
                         progress=False, device="cpu")
    inputs = prepare(cfg)
    there = available_tokens(inputs, 1_000_000)
    assert 0 < there < 1_000
    stats = run_pass(inputs, [])
    assert stats.tokens_analysed == there  # what the bar will count up to
    assert available_tokens(inputs, 7) == 7  # the budget when the corpus has more


def test_registry_links_both_ways(mlflow_store, tmp_path):
    """import --register --alias, then an analysis of models:/name@alias: logged model named after the
    SAE and an output of its run; version <-> logged model; version description links the analysis;
    the analysis description links run, logged model and version, the alias not as a mention."""
    from sae_mlops.tracking.training import import_sae

    src = import_sae(demo_sae_path("batchtopk"), register="ui-sae", alias="champion", experiment="ui")
    client = MlflowClient()
    train_run = client.get_run(src.run_id)
    assert train_run.info.run_name.startswith("import · sae_batchtopk · batchtopk d")
    assert [o.model_id for o in train_run.outputs.model_outputs] == [src.model_id]
    model = client.get_logged_model(src.model_id)
    assert model.name == "sae_batchtopk" and model.source_run_id == src.run_id
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "ui-sae", "version": 1}]
    version = client.get_model_version("ui-sae", "1")
    assert version.run_id == src.run_id and version.source == f"models:/{src.model_id}"

    outcome = _quick("models:/ui-sae@champion", tmp_path / "q")
    run = client.get_run(outcome.run_id)
    assert run.info.run_name.startswith("quick · ui-sae@champion · batchtopk d") and re.search(r" k\d+$", run.info.run_name)
    assert [i.model_id for i in run.inputs.model_inputs] == [src.model_id]
    note = run.data.tags["mlflow.note.content"]
    exp = train_run.info.experiment_id
    assert f"(#/experiments/{exp}/runs/{src.run_id})" in note
    assert f"(#/experiments/{model.experiment_id}/models/{src.model_id})" in note
    assert "(#/models/ui-sae/versions/1)" in note and "`@champion`" in note
    assert " @champion" not in note.replace("`@champion`", "")
    version = client.get_model_version("ui-sae", "1")
    assert version.tags["sae_mlops.latest_analysis_run_id"] == outcome.run_id
    assert f"(#/experiments/{run.info.experiment_id}/runs/{outcome.run_id})" in version.description
    assert version.description.startswith("Latest analysis: [quick · ui-sae@champion")
    assert client.get_logged_model(src.model_id).tags["sae_mlops.latest_analysis_run_id"] == outcome.run_id


def _result(kind: str, sae_hash: str, l0: float, name: str) -> AnalysisResult:
    return AnalysisResult(
        kind=kind,
        params={"sae": f"/somewhere/{name}", "sae_name": name, "sae_architecture": "topk", "d_sae": 64, "topk_k": 8,
                "sae_hash": sae_hash, "sae_id": None},
        metrics={"sparsity/l0_mean": l0, "downstream/loss_recovered": 0.9 - l0 / 100, "recon/explained_variance": 0.8},
    )


def test_compare_latest_per_sae_and_formats(mlflow_store, tmp_path):
    from sae_mlops.tracking.compare import collect_analyses
    from sae_mlops.tracking.runs import log_analysis

    ids = {
        "old": log_analysis(_result("quick", "h1", 10.0, "a_long_sae_name_one"), [], tmp_path, experiment="cmp"),
        "new": log_analysis(_result("quick", "h1", 11.0, "a_long_sae_name_one"), [], tmp_path, experiment="cmp"),
        "full": log_analysis(_result("full", "h1", 12.0, "a_long_sae_name_one"), [], tmp_path, experiment="cmp"),
        "other": log_analysis(_result("quick", "h2", 20.0, "sae_two"), [], tmp_path, experiment="cmp"),
    }
    df = collect_analyses(["cmp"])
    assert sorted(df["run_id"]) == sorted([ids["new"], ids["full"], ids["other"]])
    assert set(df["label"]) == {"a_long_sae_name_one · quick", "a_long_sae_name_one · full", "sae_two · quick"}
    assert len(collect_analyses(["cmp"], all_runs=True)) == 4
    assert set(df["k"]) == {8.0} and set(df["sae_name"]) == {"a_long_sae_name_one", "sae_two"}

    r = runner.invoke(app, ["compare", "-e", "cmp", "--out", str(tmp_path / "c1"), "--no-track", "--format", "csv"])
    assert r.exit_code == 0, r.output
    csv_lines = r.stdout.splitlines()
    assert csv_lines[0].startswith("run_id,") and len(csv_lines) == 4
    r = runner.invoke(app, ["compare", "-e", "cmp", "--out", str(tmp_path / "c2"), "--no-track", "--format", "md", "--all"])
    assert r.exit_code == 0, r.output
    md = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
    assert len(md) == 2 + 4 and "| kind | SAE |" in md[0]
    # the readable table, piped (CliRunner is not a terminal): one line per analysis, nothing folded
    r = runner.invoke(app, ["compare", "-e", "cmp", "--out", str(tmp_path / "c3"), "--no-track"])
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.stdout.splitlines() if "a_long_sae_name_one" in ln and ln.startswith("│")]
    assert len(rows) == 2 and all("explained" not in ln for ln in rows)
    header = next(ln for ln in r.stdout.splitlines() if "loss recovered" in ln)
    assert "explained variance" in header and "frontier (LR)" in header and "run id" in header


def test_plots_logged_as_images_and_report_html(mlflow_store, tmp_path):
    """PNGs also go in as MLflow images (the chart view's image grid); README.html embeds them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sae_mlops.tracking.runs import log_analysis
    from sae_mlops.files import atomic_write_text
    from sae_mlops.outputs.full_reports import report_html

    out = tmp_path / "o"
    (out / "plots").mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(out / "plots" / "l0_histogram.png")
    plt.close(fig)
    html = report_html("| a | b |\n|---|---|\n| KL(clean \\|\\| SAE) | 1 |\n\n![L0](plots/l0_histogram.png)\n", out)
    page = atomic_write_text(out / "README.html", html)
    assert "data:image/png;base64," in html and "plots/l0_histogram.png" not in html and "KL(clean || SAE)" in html
    assert stat.S_IMODE(page.stat().st_mode) == 0o644
    run_id = log_analysis(_result("full", "h9", 5.0, "x"), [out / "plots" / "l0_histogram.png", page], out, experiment="img")
    client = MlflowClient()
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"README.html", "plots", "images"} <= top
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any(p.startswith("images/l0_histogram") and p.endswith(".png") for p in images)


def test_notebook_html_hides_code_unless_asked(tmp_path):
    import nbformat

    from sae_mlops.interp.notebook_report import notebook_to_html

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("secret_code_line = 41 + 1\nprint(secret_code_line)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="forty-two\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# Results"), cell]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, str(path))
    hidden = notebook_to_html(path, tmp_path / "h.html").read_text()
    shown = notebook_to_html(path, tmp_path / "s.html", show_code=True).read_text()
    assert "forty-two" in hidden and "secret_code_line" not in hidden
    assert "forty-two" in shown and "secret_code_line" in shown


@pytest.mark.parametrize("kind", ["standard", "batchtopk"])
def test_every_source_fills_architecture_d_sae_and_k(kind, tmp_path):
    from sae_mlops.analyses.quick import prepare, resolved_params
    from sae_mlops.core.engine import PassStats

    inputs = prepare(AnalysisConfig(sae=str(demo_sae_path(kind)), model="demo", corpus=str(demo_corpus_path()), progress=False))
    p = resolved_params(inputs, PassStats())
    assert p["sae_architecture"] == kind and p["d_sae"] > 0 and p["sae_name"] == f"sae_{kind}"
    assert (p["topk_k"] is not None) == (kind == "batchtopk")


def test_mlflow_run_names_generated_ones_replaced(mlflow_store, tmp_path, monkeypatch):
    """Under `mlflow run` (MLFLOW_RUN_ID): MLflow's random name gives way to the explicit one, a
    name given with `mlflow run --run-name` stays."""
    from sae_mlops.tracking.runs import log_analysis

    client = MlflowClient()
    exp = client.create_experiment("launched")
    for given, expected in (("overjoyed-slug-911", "quick · sae_two · topk d64 k8"), ("my own name", "my own name")):
        run = client.create_run(exp, run_name=given)
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        log_analysis(_result("quick", "h3", 3.0, "sae_two"), [], tmp_path)
        assert client.get_run(run.info.run_id).info.run_name == expected


def test_stable_layout_is_read_and_old_layouts_still_are(tmp_path):
    """The interpretation loader reads the stable names (its timestamp from the results JSON) and
    still reads a directory written with timestamped names."""
    import pandas as pd

    from sae_mlops.interp.data import find_newest, load_analysis

    def summary(f: int) -> dict:
        return {"feature": f, "activation_frequency": 2, "mean_activation": 1.0, "top_examples": []}

    for root, suffix in ((tmp_path / "new", ""), (tmp_path / "old", "_20240101_000000")):
        (root / "results").mkdir(parents=True)
        (root / "results" / f"feature_summaries{suffix}.jsonl").write_text("\n".join(json.dumps(summary(f)) for f in (0, 2)) + "\n")
        pd.DataFrame({"feature": range(3), "firing_count": [2, 0, 2], "frequency": [0.5, 0.0, 0.5],
                      "mean_activation": 1.0, "max_activation": 1.0}).to_parquet(root / "results" / f"feature_stats{suffix}.parquet")
        doc = {"params": {"d_sae": 3}, "metrics": {}, "details": {"finished_at": "2026-12-01T00:00:00Z"}}
        (root / "results" / f"analysis_results{suffix}.json").write_text(json.dumps(doc))
    new, old = load_analysis(tmp_path / "new"), load_analysis(tmp_path / "old")
    assert new.timestamp == "2026-12-01T00:00:00Z" and old.timestamp == "20240101_000000"
    assert new.d_sae == old.d_sae == 3 and new.files["feature_stats"].name == "feature_stats.parquet"
    assert find_newest(tmp_path / "new" / "results", "feature_summaries_", ".jsonl").name == "feature_summaries.jsonl"
