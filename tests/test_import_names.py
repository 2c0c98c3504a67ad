"""`import` of SAE directories named as the prior tool names them (dots: not allowed in an MLflow
model name) with --register, and a FAILED import that must not block a later one. A real sqlite store."""

from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.demo import demo_sae_path, ensure_demo_assets

runner = CliRunner()
DOTTED = "demo.blocks.1.hook_resid_post.std_l1_3e-3"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    import mlflow

    ensure_demo_assets()
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    shutil.copytree(demo_sae_path("standard"), tmp_path / DOTTED)
    return uri


def test_a_dotted_name_is_registered_under_a_valid_name(store, tmp_path):
    r = runner.invoke(app, ["import", str(tmp_path / DOTTED), "--register", DOTTED, "--alias", "champion"],
                      terminal_width=400)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    valid = "demo-blocks-1-hook_resid_post-std_l1_3e-3"
    assert f"registering {DOTTED!r} as {valid!r}" in " ".join(r.stderr.split())
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias(valid, "champion").version) == "1"


def test_a_failed_import_never_blocks_a_later_one(store, tmp_path, monkeypatch):
    from sae_mlops.tracking import training

    def broken(*args, **kwargs):
        raise RuntimeError("registry down")

    monkeypatch.setattr(training, "register_sae_model", broken)  # the registration fails after the run is logged
    r = runner.invoke(app, ["import", str(tmp_path / DOTTED), "--register", "demo-sae"], terminal_width=400)
    assert r.exit_code != 0
    client = MlflowClient(store)
    failed = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`sae_mlops.kind` = 'import'")
    assert [run.info.status for run in failed] == ["FAILED"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["import", str(tmp_path / DOTTED), "--register", "demo-sae"], terminal_width=400)
    assert r.exit_code == 0, r.output
    assert "Already in MLflow" not in r.output
    assert [str(v.version) for v in client.search_model_versions("name = 'demo-sae'")] == ["1"]
