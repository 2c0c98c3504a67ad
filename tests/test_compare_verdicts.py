"""`sae-mlops compare` with verdicts, end to end on a real sqlite MLflow store: two tracked quick
analyses of the demo (the standard SAE and a copy with a noisier decoder), compared with the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from typer.testing import CliRunner

from sae_mlops.cli import app


def _noisy_copy(tmp: Path) -> Path:
    from sae_mlops.demo.assets import demo_sae_path

    out = tmp / "sae_noisy"
    shutil.copytree(demo_sae_path("standard"), out)
    w = torch.load(out / "weights.pt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    w["W_dec"] = w["W_dec"] + 0.3 * w["W_dec"].std() * torch.randn(w["W_dec"].shape, generator=gen)
    torch.save(w, out / "weights.pt")
    return out


def test_compare_prints_and_logs_verdicts(tmp_path: Path, mlflow_store: str) -> None:
    import mlflow

    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo.assets import demo_sae_path
    from sae_mlops.workflows import run_quick_and_log

    for name, sae in (("reference", demo_sae_path("standard")), ("noisy", _noisy_copy(tmp_path))):
        cfg = AnalysisConfig(sae=str(sae), model="demo", max_tokens=6000, progress=False)
        run_quick_and_log(cfg, tmp_path / name, experiment="verdicts", run_name=name)
    runner = CliRunner()
    bad = runner.invoke(app, ["compare", "-e", "verdicts", "--reference", "nope", "--no-track", "--out", str(tmp_path / "c0")])
    assert bad.exit_code == 2 and "--reference 'nope' matches no compared analysis" in bad.output
    r = runner.invoke(app, ["compare", "-e", "verdicts", "--reference", "reference", "--resamples", "1999",
                            "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    assert "Verdicts against" in r.output and "worse" in r.output and "Holm" in r.output
    md = (tmp_path / "cmp" / "verdicts.md").read_text()
    assert "| noisy · quick | loss recovered |" in md.replace("sae_noisy", "noisy")
    html = (tmp_path / "cmp" / "README.html").read_text()
    assert "Verdicts" in html and "worse" in html
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("verdicts")
    runs = client.search_runs([exp.experiment_id], "tags.`sae_mlops.kind` = 'compare'")
    assert len(runs) == 1
    m = runs[0].data.metrics
    key = next(k for k in m if k.startswith("diff/loss_recovered/") and not k.endswith(("_ci_low", "_ci_high")))
    assert m[key] < 0 and m[key + "_ci_high"] < 0  # the noisier decoder recovers less loss, significantly
    assert "worse on" in runs[0].data.tags["mlflow.note.content"]
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"README.html", "verdicts.md", "verdicts.csv"} <= arts


def test_compare_baseline_judges_a_trained_sae_against_random_directions(tmp_path: Path, mlflow_store: str) -> None:
    """`compare --baseline`: the demo SAE against a copy whose decoder directions are random (what the
    frozen-decoder baseline of arXiv 2602.14111 keeps), the copy's run tagged as a baseline."""
    import mlflow

    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo.assets import demo_sae_path
    from sae_mlops.workflows import run_quick_and_log

    rand = tmp_path / "sae_random_decoder"
    shutil.copytree(demo_sae_path("standard"), rand)
    w = torch.load(rand / "weights.pt", weights_only=True)
    d = torch.randn(w["W_dec"].shape, generator=torch.Generator().manual_seed(1))
    w["W_dec"] = d / d.norm(dim=1, keepdim=True) * w["W_dec"].norm(dim=1, keepdim=True)
    torch.save(w, rand / "weights.pt")
    ids = {}
    for name, sae in (("trained", demo_sae_path("standard")), ("random", rand)):
        cfg = AnalysisConfig(sae=str(sae), model="demo", max_tokens=6000, progress=False)
        ids[name] = run_quick_and_log(cfg, tmp_path / name, experiment="baselines", run_name=name).run_id
    client = mlflow.MlflowClient()
    runner = CliRunner()
    none = runner.invoke(app, ["compare", "-e", "baselines", "--baseline", "--no-track", "--out", str(tmp_path / "c0")])
    assert none.exit_code == 2 and "found no analysis of a random baseline" in none.output
    client.set_tag(ids["random"], "sae_mlops.baseline", "frozen-decoder")
    r = runner.invoke(app, ["compare", "-e", "baselines", "--baseline", "--resamples", "1999", "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "cmp" / "verdicts.csv").read_text().splitlines()
    header = rows[0].split(",")
    got = {(c[header.index("metric")], c[header.index("verdict")]) for c in (x.split(",") for x in rows[1:])}
    assert ("recon/explained_variance", "better") in got and ("downstream/loss_recovered", "better") in got
    assert all("[frozen-decoder]" in x for x in rows[1:])  # the reference of every row is the baseline


def test_compare_baseline_finds_a_baseline_trained_by_train(tmp_path: Path, mlflow_store: str) -> None:
    """The whole path a user takes: `train` a recipe and `train --baseline random-activations` (the
    frozen encoder) on the same hook and data, analyse both through their runs:/ URIs, and
    `compare --baseline` finds the baseline from the analysis's training run (no tag set by hand)."""
    import mlflow

    from sae_mlops.config import AnalysisConfig
    from sae_mlops.training import TrainConfig, train_and_log
    from sae_mlops.workflows import run_quick_and_log

    recipe: dict = {"architecture": "topk", "d_sae": 128, "k": 8, "training_tokens": 8192, "batch_size_tokens": 512,
                    "device": "cpu"}
    trained = train_and_log(TrainConfig(**recipe), tmp_path / "sae_trained", experiment="bl-e2e")
    base = train_and_log(TrainConfig(**recipe, baseline="random-activations"), tmp_path / "sae_base", experiment="bl-e2e")
    analyses = {}
    for name, outcome in (("trained", trained), ("baseline", base)):
        cfg = AnalysisConfig(sae=f"runs:/{outcome.run_id}/sae", max_tokens=4000, device="cpu", progress=False)
        analyses[name] = run_quick_and_log(cfg, tmp_path / name, experiment="bl-e2e", run_name=name).run_id
    client = mlflow.MlflowClient()
    assert "sae_mlops.baseline" not in client.get_run(analyses["baseline"]).data.tags  # only its training run has it
    assert client.get_run(base.run_id).data.tags["sae_mlops.baseline"] == "frozen-encoder"
    r = CliRunner().invoke(app, ["compare", "-e", "bl-e2e", "--baseline", "--resamples", "999", "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    import csv

    with (tmp_path / "cmp" / "verdicts.csv").open() as f:
        cells = list(csv.DictReader(f))
    assert cells and all(c["reference"].endswith("[frozen-encoder]") for c in cells)
    assert {c["metric"] for c in cells} >= {"recon/explained_variance", "downstream/loss_recovered"}
    assert {c["verdict"] for c in cells} <= {"better", "worse", "within noise"}
