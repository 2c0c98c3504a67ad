"""log_analysis against a real sqlite MLflow store: what goes in comes back out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sae_mlops.core.results import AnalysisResult
from sae_mlops.tracking import runs
from sae_mlops.tracking.runs import log_analysis


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A fresh sqlite store in tmp_path; artifacts land under tmp_path too (cwd)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    # An explicit set_tracking_uri (by earlier code in this process) would override the env var.
    tracking_utils = mlflow.tracking._tracking_service.utils
    previous = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    tracking_utils._tracking_uri = previous


def _result(**overrides) -> AnalysisResult:
    params = {f"p{i:03d}": i for i in range(130)}  # more than one log_batch of params
    params.update(
        {
            "hook": "blocks.1.hook_resid_post",
            "tokens.analysed": 20000,
            "prepend_bos": None,
            "long": "x" * 7000,  # over MLflow's 6000-char param limit
            "nested": {"b": 1, "a": [1, 2]},
            "sae.content_hash": "abc123",
        }
    )
    kw = {
        "kind": "quick",
        "params": params,
        "metrics": {
            "sparsity/l0_mean": 12.5,
            "sparsity/l0_std": 3.25,
            "recon/explained_variance": 0.875,
            "downstream/ce_clean": 2.0,
            "downstream/not_a_headline": float("nan"),  # a NaN headline metric fails the run (own test)
            "downstream/kl_score": None,
            "speed/tokens_per_s": float("inf"),
            "tokens/analysed": 20000,
        },
        "tags": {
            "sae_mlops.source_run_id": "0" * 32,
            "sae_mlops.source_model_name": "my-sae",
            "sae_mlops.source_model_version": "3",
            "sae_mlops.source_model_alias": "prod",
        },
    }
    kw.update(overrides)
    return AnalysisResult(**kw)


def _files(tmp_path: Path) -> tuple[Path, list[Path]]:
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    a = out / "results" / "analysis_results_x.json"
    a.write_text(json.dumps({"hello": 1}))
    b = out / "SUMMARY_x.md"
    b.write_text("# summary\n")
    return out, [a, b]


def test_new_run_round_trip(store, tmp_path):
    result = _result()
    out, files = _files(tmp_path)
    run_id = log_analysis(result, files, out, experiment="exp-a", run_name="rn")

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "rn"
    assert client.get_experiment(run.info.experiment_id).name == "exp-a"

    # params: every one, stringified, long values cut to MLflow's limit
    p = run.data.params
    assert len(p) == len(result.params) - 1  # prepend_bos=None is absent, not the string 'None'
    assert p["p129"] == "129"
    assert p["hook"] == "blocks.1.hook_resid_post"
    assert p["tokens.analysed"] == "20000"
    assert "prepend_bos" not in p and "None" not in p.values()
    assert json.loads(p["nested"]) == {"a": [1, 2], "b": 1}
    assert len(p["long"]) == 6000 and p["long"].startswith("xxxx") and p["long"].endswith("[truncated]")

    # metrics: finite ones exactly, the rest named in a tag
    finite = {k: float(v) for k, v in result.metrics.items() if v is not None and math.isfinite(v)}
    assert run.data.metrics == finite
    unlogged = set(run.data.tags["sae_mlops.unlogged_metrics"].split(","))
    assert unlogged == {"downstream/not_a_headline", "downstream/kl_score", "speed/tokens_per_s"}

    # tags: lineage as given, kind, hash, note linking the source; never a parent run
    t = run.data.tags
    for k, v in result.tags.items():
        assert t[k] == v
    assert t["sae_mlops.kind"] == "quick"
    assert t["sae_mlops.sae_hash"] == "abc123"
    assert "mlflow.parentRunId" not in t
    assert "0" * 32 in t["mlflow.note.content"] and "my-sae v3" in t["mlflow.note.content"]
    assert "`@prod`" in t["mlflow.note.content"]  # code formatting: not an @mention link
    assert t["mlflow.note.content"].startswith("**quick analysis** · L0 **12.50** · explained variance **0.8750**")

    # artifacts: paths relative to out_dir
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["SUMMARY_x.md", "results"]
    assert [a.path for a in client.list_artifacts(run_id, "results")] == ["results/analysis_results_x.json"]
    local = client.download_artifacts(run_id, "results/analysis_results_x.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == {"hello": 1}


def test_default_experiment_and_no_lineage(store, tmp_path):
    out, files = _files(tmp_path)
    result = _result(tags={}, metrics={"sparsity/l0_mean": 1.0})
    run_id = log_analysis(result, files, out)
    run = MlflowClient(store).get_run(run_id)
    assert MlflowClient(store).get_experiment(run.info.experiment_id).name == runs.DEFAULT_EXPERIMENT
    assert run.data.tags["mlflow.note.content"] == "**quick analysis** · L0 **1.00**"  # the headline only
    assert "sae_mlops.unlogged_metrics" not in run.data.tags
    assert run.data.metrics == {"sparsity/l0_mean": 1.0}


def test_logs_into_mlflow_run_id(store, tmp_path, monkeypatch):
    """As under `mlflow run`: the run exists (with the -P params logged) and MLFLOW_RUN_ID names it."""
    client = MlflowClient(store)
    exp = client.create_experiment("launched")
    outer = client.create_run(exp)
    client.log_param(outer.info.run_id, "hook", "''")  # mlflow run logs -P values shell-quoted
    client.log_param(outer.info.run_id, "tokens.analysed", "20000")  # same value: not a conflict
    client.log_param(outer.info.run_id, "prepend_bos", "''")  # not given, resolved to None: not a conflict
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    out, files = _files(tmp_path)
    result = _result()
    run_id = log_analysis(result, files, out, experiment="ignored")
    assert run_id == outer.info.run_id
    run = client.get_run(run_id)
    assert run.info.experiment_id == exp
    assert client.get_experiment_by_name("ignored") is None
    assert run.info.status == "RUNNING"  # its owner (mlflow run) ends it
    assert run.data.params["hook"] == "''"
    assert run.data.params["resolved.hook"] == "blocks.1.hook_resid_post"
    assert run.data.params["prepend_bos"] == "''" and "resolved.prepend_bos" not in run.data.params
    assert run.data.tags["sae_mlops.param_conflicts"] == "hook"
    assert run.data.metrics["sparsity/l0_mean"] == 12.5
    assert len(client.search_runs([exp])) == 1


def test_source_run_in_store_gets_ui_link(store, tmp_path):
    client = MlflowClient(store)
    exp = client.create_experiment("training")
    src = client.create_run(exp).info.run_id
    out, files = _files(tmp_path)
    run_id = log_analysis(_result(tags={"sae_mlops.source_run_id": src}), files, out)
    note = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert f"#/experiments/{exp}/runs/{src}" in note


def test_a_nan_headline_metric_never_gives_a_finished_run(store, tmp_path):
    """A result whose headline quality metric is NaN (e.g. an SAE that diverged) is logged, tagged
    with the metric's name and ended FAILED, so it does not enter comparisons as a normal run."""
    from sae_mlops.tracking.runs import TAG_NONFINITE

    out, files = _files(tmp_path)
    result = _result()
    result.metrics["recon/explained_variance"] = float("nan")
    run_id = log_analysis(result, files, out, experiment="nan-check")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[TAG_NONFINITE] == "recon/explained_variance"


def test_timing_detail_goes_to_a_file_not_the_run_page(store, tmp_path):
    """The run page shows the wall time per stage (to the millisecond); CPU seconds and the parts of
    the pass, two dozen figures a researcher rarely compares, go to timings.json at full precision."""
    out, files = _files(tmp_path)
    timings = {"time/pass": 12.3456789, "time/load": 0.1234567, "time/pass_share": 0.87654321,
               "time/pass/model": 9.87654321, "time_cpu/pass": 20.123456789, "time_cpu/pass/model": 15.5}
    run_id = log_analysis(_result(tags={}, metrics={"sparsity/l0_mean": 1.0, **timings}), files, out)
    client = MlflowClient(store)
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"sparsity/l0_mean": 1.0, "time/pass": 12.346, "time/load": 0.123, "time/pass_share": 0.87654321}
    assert "timings.json" in {a.path for a in client.list_artifacts(run_id)}
    detail = json.loads(Path(client.download_artifacts(run_id, "timings.json", str(tmp_path / "dl"))).read_text())
    assert detail == {k: v for k, v in timings.items() if k.startswith(("time_cpu/", "time/pass/"))}
    runs.log_metrics(run_id, {"time/total": 30.00049, "time_cpu/total": 1.0})
    metrics = client.get_run(run_id).data.metrics
    assert metrics["time/total"] == 30.0 and "time_cpu/total" not in metrics
