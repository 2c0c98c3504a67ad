"""MLflow URIs (runs:/, models:/name/version, models:/name@alias, models:/<logged model id>) against
a real local sqlite store, with lineage tags; and every missing-resource case."""

from __future__ import annotations

import pytest

from sae_mlops.errors import InputError
from sae_mlops.sources.sae import load_sae
from sae_mlops.tracking.resolve import (
    TAG_SOURCE_LOGGED_MODEL_ID,
    TAG_SOURCE_MODEL_ALIAS,
    TAG_SOURCE_MODEL_NAME,
    TAG_SOURCE_MODEL_VERSION,
    TAG_SOURCE_RUN_ID,
    TAG_SOURCE_URI,
    find_sae_dir,
    resolve_mlflow_uri,
)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_store_at, make_saelens_sae, make_legacy_sae):
    """A run holding a SAELens SAE under "sae" and a prior-format one under "legacy/<dir>",
    registered as versions 1 (run artifact) and 2 (LoggedModel) of "demo-sae", alias "prod" -> 1."""
    with mlflow_store_at(tmp_path_factory.mktemp("mlflow")):
        yield _register(make_saelens_sae, make_legacy_sae)


def _register(make_saelens_sae, make_legacy_sae) -> dict:
    import mlflow
    from mlflow import MlflowClient

    saelens_dir = make_saelens_sae("topk", k=3)
    legacy_dir = make_legacy_sae(name="prior_sae", top_k=2)
    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(saelens_dir), artifact_path="sae")
        mlflow.log_artifacts(str(legacy_dir), artifact_path="legacy/prior_sae")
        logged = mlflow.initialize_logged_model(name="sae_model", source_run_id=run.info.run_id)
        client.log_model_artifacts(logged.model_id, str(saelens_dir))
        mlflow.finalize_logged_model(logged.model_id, "READY")
    run_id = run.info.run_id
    client.create_registered_model("demo-sae")
    client.create_model_version("demo-sae", source=f"runs:/{run_id}/sae", run_id=run_id)
    mlflow.register_model(f"models:/{logged.model_id}", "demo-sae")
    client.set_registered_model_alias("demo-sae", "prod", "1")
    return {"run_id": run_id, "model_id": logged.model_id, "saelens_dir": saelens_dir}


def test_runs_uri(registered):
    run_id = registered["run_id"]
    uri = f"runs:/{run_id}/sae"
    loaded = load_sae(uri)
    assert loaded.info.architecture == "topk" and loaded.info.source == uri
    assert loaded.info.lineage == {TAG_SOURCE_URI: uri, TAG_SOURCE_RUN_ID: run_id}
    assert loaded.info.local_path.name == "sae"
    from sae_mlops.sources.hashing import sha256_directory

    assert loaded.info.content_hash == sha256_directory(registered["saelens_dir"])


def test_runs_uri_finds_single_sae_subdirectory(registered):
    loaded = load_sae(f"runs:/{registered['run_id']}/legacy")
    assert loaded.info.format == "legacy" and loaded.info.local_path.name == "prior_sae"


def test_runs_uri_with_several_sae_directories(registered):
    with pytest.raises(InputError, match="several SAE directories .*legacy/prior_sae.*sae"):
        resolve_mlflow_uri(f"runs:/{registered['run_id']}")


def test_models_version_uri(registered):
    loaded = load_sae("models:/demo-sae/1")
    assert loaded.info.lineage == {
        TAG_SOURCE_URI: "models:/demo-sae/1",
        TAG_SOURCE_RUN_ID: registered["run_id"],
        TAG_SOURCE_MODEL_NAME: "demo-sae",
        TAG_SOURCE_MODEL_VERSION: "1",
    }


def test_models_alias_uri(registered):
    loaded = load_sae("models:/demo-sae@prod")
    lineage = loaded.info.lineage
    assert lineage[TAG_SOURCE_MODEL_ALIAS] == "prod"
    assert lineage[TAG_SOURCE_MODEL_VERSION] == "1"
    assert lineage[TAG_SOURCE_RUN_ID] == registered["run_id"]
    assert lineage[TAG_SOURCE_MODEL_NAME] == "demo-sae"


def test_models_version_backed_by_logged_model(registered):
    lineage = load_sae("models:/demo-sae/latest").info.lineage
    assert lineage[TAG_SOURCE_MODEL_VERSION] == "2"
    assert lineage[TAG_SOURCE_LOGGED_MODEL_ID] == registered["model_id"]
    assert lineage[TAG_SOURCE_RUN_ID] == registered["run_id"]


def test_logged_model_uri(registered):
    model_id = registered["model_id"]
    lineage = load_sae(f"models:/{model_id}").info.lineage
    assert lineage[TAG_SOURCE_LOGGED_MODEL_ID] == model_id
    assert lineage[TAG_SOURCE_RUN_ID] == registered["run_id"]


def test_download_to_given_directory(registered, tmp_path):
    resolved = resolve_mlflow_uri("models:/demo-sae@prod", dst_dir=tmp_path / "dl")
    assert resolved.download_dir == tmp_path / "dl"
    assert resolved.local_path.is_relative_to(tmp_path / "dl")


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("runs:/0123456789abcdef/sae", "run 0123456789abcdef"),
        ("models:/no-such-model/1", "Registered model 'no-such-model'"),
        ("models:/demo-sae/7", "has no version 7"),
        ("models:/demo-sae@staging", "has no alias 'staging'"),
        ("models:/demo-sae/one", "is not a number"),
        ("models:/demo-sae", "names no version or alias"),
        ("models:/m-0123456789abcdef0123456789abcdef", "logged model m-0123456789abcdef0123456789abcdef"),
    ],
)
def test_missing_resources(registered, uri, fragment):
    with pytest.raises(InputError) as info:
        load_sae(uri)
    assert fragment in str(info.value)


def test_missing_artifact_path(registered):
    uri = f"runs:/{registered['run_id']}/nothere"
    with pytest.raises(InputError, match="could not be downloaded"):
        load_sae(uri)


def test_artifacts_without_sae_files(mlflow_store, tmp_path):
    import mlflow

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no SAE here")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "notes"), artifact_path="notes")
    with pytest.raises(InputError, match="hold no SAE files"):
        load_sae(f"runs:/{run.info.run_id}/notes")


def test_find_sae_dir_prefers_root(make_saelens_sae):
    path = make_saelens_sae()
    assert find_sae_dir(path, "x") == path
