"""Lineage end to end against a real ``mlflow server`` on loopback with a SQL backend (sqlite and
PostgreSQL): train -> register with alias -> quick analysis via models:/name@alias -> compare, with
lineage asserted both ways; import (history -> per-epoch metrics; the same SAE twice); bad input.

One server per backend for the whole module (module-scoped, parametrized fixture).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from mlflow_servers import mlflow_server, postgres_cluster, postgres_missing
from sae_mlops.errors import InputError
from sae_mlops.tracking import lineage
from sae_mlops.tracking.lineage import find_analyses, lineage_of, training_run_of

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory) -> Iterator[str]:
    """A tracking server (sqlite or PostgreSQL backend) as the current tracking URI for the module."""
    workdir = tmp_path_factory.mktemp(f"server_{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        with _backend(request.param, workdir) as backend_uri, mlflow_server(backend_uri, workdir) as uri:
            mp.chdir(workdir)
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI"):
                mp.delenv(var, raising=False)
            mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
            mp.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
            try:
                yield request.param
            finally:
                while mlflow.active_run():
                    mlflow.end_run()


def _backend(kind: str, workdir: Path):
    if kind == "sqlite":
        from contextlib import nullcontext

        return nullcontext(f"sqlite:///{workdir / 'mlflow.db'}")
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    return postgres_cluster()


def _cli(*args: str):
    from sae_mlops.cli import app

    return CliRunner().invoke(app, list(args))


# --- train -> register -> quick -> compare ---------------------------------------------------------


def test_train_register_analyse_compare(server, demo_assets, tmp_path):
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.workflows import run_quick_and_log
    from sae_mlops.tracking.compare import compare_and_log
    from sae_mlops.training import TrainConfig, train_and_log

    client = MlflowClient()
    exp = f"e2e-{server}"
    name = f"demo-sae-{server}"
    cfg = TrainConfig(architecture="topk", d_sae=128, k=8, training_tokens=8192, batch_size_tokens=512, device="cpu")
    trained = train_and_log(cfg, tmp_path / "sae", register=name, alias="champion", experiment=exp)

    # the training run: params, per-step metrics, the logged model, the registered version
    run = client.get_run(trained.run_id)
    assert run.data.tags["sae_mlops.kind"] == "train"
    assert run.data.params["architecture"] == "topk" and run.data.params["d_sae"] == "128"
    # the hook was not given (None: not logged), so the resolved one is the param itself
    assert run.data.params["hook"] == "blocks.0.hook_resid_post" and "resolved.hook" not in run.data.params
    steps = 8192 // 512
    for metric in ("train/loss", "train/mse", "train/l0", "train/dead_features"):
        history = client.get_metric_history(trained.run_id, metric)
        assert [m.step for m in history] == list(range(steps)), metric
    assert run.data.tags["sae_mlops.sae_hash"] == trained.sae_hash
    assert run.data.tags["sae_mlops.logged_model_id"] == trained.model_id
    assert run.inputs.dataset_inputs[0].dataset.name == "corpus.json"
    logged = client.get_logged_model(trained.model_id)
    assert logged.source_run_id == trained.run_id and logged.model_type == "sae"
    assert {m.key for m in logged.metrics} >= {"train/final_l0"}
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == "1" and lineage.model_id_of_version(version) == trained.model_id
    artifacts = {a.path for a in client.list_artifacts(trained.run_id, "sae")}
    assert {"sae/cfg.json", "sae/sae_weights.safetensors"} <= artifacts

    # quick analysis through the alias: lineage analysis -> training run
    quick = run_quick_and_log(
        AnalysisConfig(sae=f"models:/{name}@champion", max_tokens=4000, device="cpu", progress=False),
        tmp_path / "quick1",
        experiment=exp,
    )
    link = lineage_of(quick.run_id)
    assert training_run_of(quick.run_id) == trained.run_id
    assert link["logged_model_id"] == trained.model_id
    assert (link["model_name"], link["model_version"], link["model_alias"]) == (name, "1", "champion")
    assert link["sae_hash"] == trained.sae_hash and link["resolved_by"] == "uri"
    assert link["code_version"].startswith("0.")
    analysis = client.get_run(quick.run_id)
    assert [m.model_id for m in analysis.inputs.model_inputs] == [trained.model_id]
    dataset = analysis.inputs.dataset_inputs[0]
    assert dataset.dataset.digest == quick.result.params["corpus_digest"][:16]
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "analysis"
    linked = {m.key: m.value for m in client.get_logged_model(trained.model_id).metrics if m.run_id == quick.run_id}
    assert linked["sparsity/l0_mean"] == pytest.approx(quick.result.metrics["sparsity/l0_mean"])

    # the same SAE as a local directory: lineage found by content hash
    local = run_quick_and_log(
        AnalysisConfig(sae=str(trained.sae_dir), model="demo", max_tokens=2000, device="cpu", progress=False),
        tmp_path / "quick2",
        experiment=exp,
    )
    local_link = lineage_of(local.run_id)
    assert local_link["resolved_by"] == "content_hash"
    assert local_link["source_run_id"] == trained.run_id
    assert (local_link["model_name"], local_link["model_version"]) == (name, "1")

    # model version -> its analyses
    found = [r.info.run_id for r in find_analyses(name, 1)]
    assert found == [local.run_id, quick.run_id]
    assert client.get_model_version(name, "1").tags["sae_mlops.latest_analysis_run_id"] == local.run_id

    # compare: table + Pareto plots, logged as a comparison run
    outcome = compare_and_log([exp], None, tmp_path / "cmp", all_runs=True)  # both analyses of the one SAE
    table = outcome.table
    assert sorted(table["run_id"]) == sorted([quick.run_id, local.run_id])
    assert set(table["architecture"]) == {"topk"} and set(table["k"]) == {8.0} and set(table["d_sae"]) == {128.0}
    assert table["pareto_loss_recovered"].any() and table["pareto_explained_variance"].any()
    names = sorted(a.path for a in client.list_artifacts(outcome.run_id))
    assert names == [
        "README.html",
        "comparison.csv",
        "comparison.html",
        "comparison.md",
        "pareto_l0_vs_explained_variance.png",
        "pareto_l0_vs_loss_recovered.png",
        "verdicts.csv",
        "verdicts.md",
    ]
    assert client.get_run(outcome.run_id).data.tags["sae_mlops.kind"] == "compare"
    filtered = compare_and_log([exp], f"attributes.run_id = '{quick.run_id}'", tmp_path / "cmp2", track=False)
    assert list(filtered.table["run_id"]) == [quick.run_id]
    # the comparison run itself is not an analysis: comparing again still finds two (--all), and by
    # default only the latest quick analysis of that SAE (same content hash and kind)
    assert len(compare_and_log([exp], None, tmp_path / "cmp3", track=False, all_runs=True).table) == 2
    assert list(compare_and_log([exp], None, tmp_path / "cmp4", track=False).table["run_id"]) == [local.run_id]


# --- import ----------------------------------------------------------------------------------------


def test_import_prior_format_history_and_twice(server, make_legacy_sae, tmp_path):
    from sae_mlops.sources.sae import load_sae
    from sae_mlops.tracking.training import import_sae

    client = MlflowClient()
    sae_dir = make_legacy_sae(name=f"legacy_{server}", seed=11)
    first = import_sae(sae_dir, register=f"imported-{server}", alias="baseline", experiment="imports")
    assert not first.existing and first.kind == "import"
    run = client.get_run(first.run_id)
    assert run.data.tags["sae_mlops.kind"] == "import" and run.data.params["sae_format"] == "legacy"
    # history.json {"loss": [3, 2], "sparsity": [40, 20], "val_loss": [3.1, 2.2]} -> per-epoch steps
    for metric, values in {"train/loss": [3.0, 2.0], "train/l0": [40.0, 20.0], "train/val_loss": [3.1, 2.2]}.items():
        history = sorted(client.get_metric_history(first.run_id, metric), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == list(enumerate(values)), metric

    # the registered model loads back with the same content
    loaded = load_sae(f"models:/imported-{server}@baseline")
    assert loaded.info.content_hash == first.sae_hash and loaded.info.format == "legacy"

    # the same SAE again (another copy of the directory): recognised, no new run
    copy = tmp_path / "copy" / sae_dir.name
    import shutil

    shutil.copytree(sae_dir, copy)
    second = import_sae(copy, experiment="imports")
    assert second.existing and second.run_id == first.run_id and second.model_id == first.model_id
    result = _cli("import", str(copy), "--experiment", "imports")
    assert result.exit_code == 0, result.output
    assert "Already in MLflow" in result.output and first.run_id in result.output
    runs = lineage.search_runs_everywhere(client, lineage.tag_clause("sae_mlops.sae_hash", first.sae_hash))
    assert [r.info.run_id for r in runs] == [first.run_id]


def test_import_saelens_dir_cli(server, make_saelens_sae):
    sae_dir = make_saelens_sae("topk", name=f"sl_{server}", k=4, seed=5)
    result = _cli("import", str(sae_dir), "--register", f"sl-{server}", "--alias", "a1", "--experiment", "imports")
    assert result.exit_code == 0, result.output
    from sae_mlops.sources.sae import load_sae

    loaded = load_sae(f"models:/sl-{server}@a1")
    assert loaded.info.architecture == "topk"
    source = lineage.find_source_by_hash(loaded.info.content_hash)
    assert source is not None and source.data.params["k"] == "4"


# --- bad input -------------------------------------------------------------------------------------


def test_unknown_run(server):
    with pytest.raises(InputError, match="does not exist"):
        training_run_of("0" * 32)
    result = _cli("quick", "--sae", f"runs:/{'f' * 32}/sae", "--model", "demo")
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_model_without_sae_files(server, tmp_path):
    from sae_mlops.sources.sae import load_sae
    from sae_mlops.tracking.registry import log_sae_model, register_sae_model

    client = MlflowClient()
    notes = tmp_path / "not_an_sae"
    notes.mkdir()
    (notes / "README.txt").write_text("no weights here")
    run = client.create_run(client.create_experiment(f"empty-model-{server}"))
    model_id = log_sae_model(client, run.info.run_id, notes, params={}, tags={})
    register_sae_model(client, model_id, run.info.run_id, f"hollow-{server}", alias="a")
    client.set_terminated(run.info.run_id)
    with pytest.raises(InputError, match="hold no SAE files"):
        load_sae(f"models:/hollow-{server}@a")
    with pytest.raises(InputError, match="has no version 7"):
        load_sae(f"models:/hollow-{server}/7")
    with pytest.raises(InputError, match="has no alias"):
        load_sae(f"models:/hollow-{server}@missing")
    with pytest.raises(InputError, match="has no version"):
        find_analyses(f"hollow-{server}", 9)
    result = _cli("quick", "--sae", f"models:/hollow-{server}@a", "--model", "demo")
    assert result.exit_code == 2 and "hold no SAE files" in result.output


def test_compare_errors(server, tmp_path):
    from sae_mlops.tracking.compare import compare_and_log

    MlflowClient().create_experiment(f"no-analyses-{server}")
    with pytest.raises(InputError, match="No quick or full analysis runs"):
        compare_and_log([f"no-analyses-{server}"], None, tmp_path / "c1", track=False)
    with pytest.raises(InputError, match="does not exist"):
        compare_and_log(["never-created"], None, tmp_path / "c2", track=False)
    with pytest.raises(InputError, match="not a valid MLflow search filter"):
        compare_and_log(None, "metrics.l0 <<< 3", tmp_path / "c3", track=False)
    result = _cli("compare", "--experiment", f"no-analyses-{server}", "--out", str(tmp_path / "c4"))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) <= 3 and "Traceback" not in result.output


def test_alias_needs_register(server, make_legacy_sae):
    result = _cli("import", str(make_legacy_sae(name=f"alias_{server}")), "--alias", "x")
    assert result.exit_code == 2 and "--register" in result.output

