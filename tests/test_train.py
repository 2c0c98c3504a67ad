"""SAE training with SAELens: metrics reach the callback (not W&B), every architecture trains and
loads back, bad options fail early, and the CLI / MLproject entry point log a training run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sae_mlops.errors import InputError
from sae_mlops.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_wandb(monkeypatch):
    """Fail the test if SAELens calls Weights & Biases."""
    import wandb

    def refuse(*args, **kwargs):
        raise AssertionError("W&B was called")

    for name in ("init", "log", "finish"):
        monkeypatch.setattr(wandb, name, refuse)


def test_metrics_trainer_reports_each_step(no_wandb):
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from sae_mlops.training.trainer import MetricsSAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))
    acts = torch.randn(4096, 16)

    def batches():
        while True:
            for i in range(0, len(acts), 64):
                yield acts[i : i + 64]

    cfg = SAETrainerConfig(
        total_training_samples=640,
        train_batch_size_samples=64,
        lr=1e-3,
        lr_end=1e-4,
        device="cpu",
        dead_feature_window=3,
        feature_sampling_window=4,
        logger=LoggingConfig(log_to_wandb=False),
    )
    seen: list[tuple[int, dict[str, float]]] = []
    trainer = MetricsSAETrainer(cfg=cfg, sae=sae, data_provider=batches(), on_metrics=lambda s, m: seen.append((s, m)))
    trainer.fit()
    per_step = [(s, m) for s, m in seen if "train/loss" in m]
    assert [s for s, _ in per_step] == list(range(10))
    for _, m in per_step:
        assert {"train/loss", "train/mse", "train/l0", "train/dead_features", "train/explained_variance", "train/lr"} <= set(m)
        assert m["train/l0"] == pytest.approx(4.0)
    windows = [(s, m) for s, m in seen if "train/sparsity/below_1e-5" in m]
    assert [s for s, _ in windows] == [4, 8]  # feature-density windows, as SAELens would send to W&B


@pytest.mark.parametrize(
    ("architecture", "inference"),
    [("standard", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu"), ("jumprelu", "jumprelu")],
)
def test_train_sae_architectures(architecture, inference, demo_assets, no_wandb, tmp_path):
    from sae_mlops.sources.sae import load_sae_directory
    from sae_mlops.training.run import train_sae

    steps: list[int] = []
    cfg = TrainConfig(architecture=architecture, d_sae=64, k=4, training_tokens=2048, batch_size_tokens=512, device="cpu")
    result = train_sae(cfg, tmp_path / "sae", on_metrics=lambda s, m: steps.append(s) if "train/loss" in m else None)
    assert steps == [0, 1, 2, 3]
    assert sorted(p.name for p in result.sae_dir.iterdir()) == [
        "cfg.json",
        "runner_cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    assert not list(tmp_path.glob(".sae.*"))  # the temporary directory was renamed
    loaded = load_sae_directory(result.sae_dir)
    assert loaded.info.architecture == inference
    assert (loaded.info.d_in, loaded.info.d_sae) == (64, 64)
    assert loaded.info.hook_name == "blocks.0.hook_resid_post" and loaded.info.model_name == "demo"
    assert loaded.info.content_hash == result.sae_hash
    assert result.summary["train/steps"] == 4 and result.params["hook"] == "blocks.0.hook_resid_post"


def test_bad_training_options(demo_assets, tmp_path):
    from sae_mlops.training.run import train_sae

    with pytest.raises(InputError, match="architecture 'gated' is not supported"):
        train_sae(TrainConfig(architecture="gated"), tmp_path / "a")
    with pytest.raises(InputError, match="k \\(32\\) exceeds d_sae \\(16\\)"):
        train_sae(TrainConfig(d_sae=16, k=32), tmp_path / "b")
    with pytest.raises(InputError, match="fewer than one batch"):
        train_sae(TrainConfig(training_tokens=10, batch_size_tokens=512), tmp_path / "c")
    with pytest.raises(InputError, match="has no hook 'blocks.7.hook_resid_post'"):
        train_sae(TrainConfig(hook="blocks.7.hook_resid_post", device="cpu"), tmp_path / "d")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="already exists and is not empty"):
        train_sae(TrainConfig(device="cpu"), tmp_path / "full")


def test_train_cli_logs_a_training_run(mlflow_store, demo_assets, no_wandb, tmp_path):
    from sae_mlops.cli import app

    args = ["train", "--architecture", "standard", "--d-sae", "64", "--training-tokens", "2048",
            "--batch-size-tokens", "512", "--device", "cpu", "--out", str(tmp_path / "sae"), "--experiment", "t"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.data.tags["sae_mlops.kind"] == "train" and run.data.params["architecture"] == "standard"
    assert len(client.get_metric_history(run.info.run_id, "train/mse")) == 4
    assert run.data.tags["sae_mlops.logged_model_id"] in result.output
    bad = CliRunner().invoke(app, ["train", "--alias", "x"])
    assert bad.exit_code == 2 and "--register" in bad.output
    # bad input stops before a run exists
    bad = CliRunner().invoke(app, ["train", "--hook", "blocks.9.hook_resid_post", "--device", "cpu", "--experiment", "t"])
    assert bad.exit_code == 2 and "has no hook" in bad.output
    assert len(client.search_runs([client.get_experiment_by_name("t").experiment_id])) == 1


def test_mlproject_train_entry_matches_entrypoint():
    ep = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["train"]
    placeholders = re.findall(r"\{(\w+)\}", ep["command"])
    assert sorted(placeholders) == sorted(ep["parameters"])
    spec = importlib.util.spec_from_file_location("entrypoint_train", ROOT / "entrypoints" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = []
    for name, p in ep["parameters"].items():
        argv += [f"--{name.replace('_', '-')}", str(p.get("default", ""))]
    args = module.build_parser().parse_args(argv)
    from sae_mlops.options import build

    cfg = build(TrainConfig, vars(args))
    assert (cfg.model, cfg.architecture, cfg.k, cfg.training_tokens) == ("demo", "topk", 16, 300_000)
    assert cfg == TrainConfig()


def test_recipe_hash_ignores_only_the_seed():
    base = TrainConfig(d_sae=64, k=4, training_tokens=2048, batch_size_tokens=512, device="cpu")
    assert base.with_seed(7).recipe_hash() == base.recipe_hash()
    assert TrainConfig(d_sae=64, k=4, training_tokens=2048, batch_size_tokens=512, device="cpu", seed=3,
                       log_every=5).recipe_hash() == base.recipe_hash()
    for changed in ({"k": 5}, {"lr": 1e-3}, {"architecture": "standard"}, {"d_sae": 32}):
        other = TrainConfig(**{**base.to_dict(), **changed})
        assert other.recipe_hash() != base.recipe_hash(), changed
    assert len(base.recipe_hash()) == 16 and int(base.recipe_hash(), 16) >= 0


def test_train_seeds_makes_child_runs_of_one_parent(mlflow_store, demo_assets, no_wandb, tmp_path):
    """`train --seeds 2` (CLI): a parent run, two child training runs (mlflow.parentRunId) with the
    recipe hash and their seed, each a full source run (logged model, registered version); a run of
    another recipe has another hash; --alias with --seeds > 1 is refused before any run exists."""
    from sae_mlops.cli import app

    common = ["--d-sae", "64", "--k", "4", "--training-tokens", "1024", "--batch-size-tokens", "512",
              "--device", "cpu", "--experiment", "seeds"]
    bad = CliRunner().invoke(app, ["train", *common, "--seeds", "2", "--register", "m", "--alias", "champion"])
    assert bad.exit_code == 2 and "--alias with --seeds 2" in bad.output
    assert MlflowClient().get_experiment_by_name("seeds") is None
    result = CliRunner().invoke(app, ["train", *common, "--seeds", "2", "--seed", "5", "--out", str(tmp_path / "s"),
                                      "--register", "seed-sae"])
    assert result.exit_code == 0, result.output
    other = CliRunner().invoke(app, ["train", *common, "--k", "8", "--out", str(tmp_path / "k8")])
    assert other.exit_code == 0, other.output

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["sae_mlops.kind"] == "train_seeds"]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["sae_mlops.seed"]))
    (single,) = [r for r in runs if r.data.tags["sae_mlops.kind"] == "train" and "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["sae_mlops.seed"] for r in children] == ["5", "6"]
    assert [r.data.params["seed"] for r in children] == ["5", "6"]
    recipe = parent.data.tags["sae_mlops.recipe_hash"]
    assert {r.data.tags["sae_mlops.recipe_hash"] for r in children} == {recipe}
    assert recipe == TrainConfig(d_sae=64, k=4, training_tokens=1024, batch_size_tokens=512, device="cpu").recipe_hash()
    assert single.data.tags["sae_mlops.recipe_hash"] != recipe and single.data.tags["sae_mlops.seed"] == "42"
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    assert "seed" not in parent.data.params and parent.data.params["seeds"] == "2"
    # each child is a normal training run: own SAE (different weights), logged model, registered version
    hashes = {r.data.tags["sae_mlops.sae_hash"] for r in children}
    assert len(hashes) == 2
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["seed-5", "seed-6"]
    versions = client.search_model_versions("name='seed-sae'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in children)
    assert all(r.data.tags.get("sae_mlops.logged_model_id") for r in children)
    # the parent's seed statistics are those of the children
    import numpy as np

    l0 = [r.data.metrics["train/final_l0"] for r in children]
    assert parent.data.metrics["train/final_l0_seed_mean"] == pytest.approx(np.mean(l0))
    assert parent.data.metrics["train/final_l0_seed_std"] == pytest.approx(np.std(l0, ddof=1))


def test_train_entry_point_seeds_nest_under_the_mlflow_run(mlflow_store, demo_assets, no_wandb, tmp_path, monkeypatch):
    """Under `mlflow run` (MLFLOW_RUN_ID set), `-P seeds=2` makes that run the parent of two seed runs."""
    client = MlflowClient()
    exp = client.create_experiment("ep-seeds")
    parent = client.create_run(exp).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    spec = importlib.util.spec_from_file_location("entrypoint_train_seeds", ROOT / "entrypoints" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--d-sae", "64", "--k", "4", "--training-tokens", "1024", "--batch-size-tokens", "512",
                      "--device", "cpu", "--out", str(tmp_path / "s"), "--seeds", "2", "--seed", "1", "--register", "",
                      "--alias", ""])
    assert rc == 0
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["sae_mlops.seed"] for r in children) == ["1", "2"]
    tags = client.get_run(parent).data.tags
    assert tags["sae_mlops.kind"] == "train_seeds"
    assert {r.data.tags["sae_mlops.recipe_hash"] for r in children} == {tags["sae_mlops.recipe_hash"]}
    # an analysis of a seed's SAE carries that seed's recipe hash and seed (lineage), for compare to group by
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.workflows import run_quick_and_log

    monkeypatch.delenv("MLFLOW_RUN_ID")
    child = min(children, key=lambda r: r.data.tags["sae_mlops.seed"])
    quick = run_quick_and_log(AnalysisConfig(sae=f"runs:/{child.info.run_id}/sae", max_tokens=1024, device="cpu",
                                             progress=False), tmp_path / "q", experiment="ep-seeds")
    analysis = client.get_run(quick.run_id).data.tags
    assert analysis["sae_mlops.recipe_hash"] == tags["sae_mlops.recipe_hash"] and analysis["sae_mlops.seed"] == "1"
