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
