"""Comparison of analyses: the Pareto frontier, the table and plots, the MLflow query behind them,
and the `compare` CLI / MLproject entry point (a local sqlite store; the server case is in
test_lineage_e2e.py)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sae_mlops.errors import InputError
from sae_mlops.core.results import AnalysisResult
from sae_mlops.outputs.comparison import add_frontiers, markdown_table, pareto_mask, write_comparison

ROOT = Path(__file__).resolve().parents[1]


def test_pareto_mask():
    l0 = [10, 20, 30, 15, 40, float("nan"), 10]
    quality = [0.5, 0.8, 0.7, 0.5, 0.9, 0.99, 0.5]
    # (10, .5) twice: neither dominates the other (equal) -> both on the frontier;
    # (15, .5) dominated by (10, .5); (30, .7) by (20, .8); NaN never on it
    assert pareto_mask(l0, quality).tolist() == [True, True, False, False, True, False, True]
    assert pareto_mask([], []).tolist() == []
    assert pareto_mask([5.0], [float("nan")]).tolist() == [False]


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["a" * 32, "b" * 32, "c" * 32],
            "kind": ["quick", "full", "quick"],
            "sae_name": ["sae|one", "two", "three"],
            "architecture": ["topk", "standard", "jumprelu"],
            "d_sae": [512.0, 512.0, 1024.0],
            "k": [16.0, float("nan"), float("nan")],
            "l0": [16.0, 40.0, 30.0],
            "loss_recovered": [0.9, 0.95, 0.85],
            "explained_variance": [0.8, 0.7, 0.9],
            "label": ["one", "two", "three"],
        }
    )


def test_write_comparison(tmp_path):
    df = add_frontiers(_frame())
    assert df["pareto_loss_recovered"].tolist() == [True, True, False]
    assert df["pareto_explained_variance"].tolist() == [True, False, True]
    files = write_comparison(df, tmp_path, context="3 analyses")
    assert sorted(f.name for f in files) == [
        "README.html",
        "comparison.csv",
        "comparison.html",
        "comparison.md",
        "pareto_l0_vs_explained_variance.png",
        "pareto_l0_vs_loss_recovered.png",
    ]
    back = pd.read_csv(tmp_path / "comparison.csv")
    assert back["l0"].tolist() == [16.0, 40.0, 30.0]
    md = (tmp_path / "comparison.md").read_text()
    assert "| kind | SAE |" in md and "sae\\|one" in md and "![L0 vs loss recovered]" in md
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("pareto_l0_vs_loss_recovered.png",))
    table = markdown_table(df)
    assert len(table.strip().splitlines()) == 2 + 3


def _analysis(kind: str, l0: float, lr: float, arch: str = "topk", k: int | None = 16, tags: dict | None = None) -> AnalysisResult:
    return AnalysisResult(
        kind=kind,
        params={"sae": f"/x/sae_{arch}_{l0}", "sae_architecture": arch, "d_sae": 256, "topk_k": k, "sae_hash": f"h{l0}"},
        metrics={
            "sparsity/l0_mean": l0,
            "downstream/loss_recovered": lr,
            "recon/explained_variance": lr - 0.1,
            "features/dead_fraction": 0.01,
            "downstream/ce_clean": 3.0,
            "downstream/kl_sae": float("nan"),
        },
        tags=tags or {},
    )


def test_collect_and_compare_in_a_store(mlflow_store, tmp_path):
    from sae_mlops.tracking.compare import collect_analyses, compare_and_log
    from sae_mlops.tracking.runs import log_analysis

    client = MlflowClient()
    source = client.create_run(client.create_experiment("src"), tags={"sae_mlops.kind": "train"})
    client.log_param(source.info.run_id, "architecture", "topk")
    client.log_param(source.info.run_id, "k", "12")
    client.set_terminated(source.info.run_id)
    ids = [
        log_analysis(_analysis("quick", 16.0, 0.9), [], tmp_path, experiment="cmp"),
        log_analysis(_analysis("full", 40.0, 0.95, arch="standard", k=None), [], tmp_path, experiment="cmp"),
        # a SAELens TopK analysis records no topk_k: k comes from its source training run
        log_analysis(
            _analysis("quick", 12.0, 0.8, k=None, tags={"sae_mlops.source_run_id": source.info.run_id}),
            [], tmp_path, experiment="cmp",
        ),
    ]
    other = client.create_run(client.get_experiment_by_name("cmp").experiment_id, tags={"sae_mlops.kind": "compare"})
    client.set_terminated(other.info.run_id)

    df = collect_analyses(["cmp"])
    assert sorted(df["run_id"]) == sorted(ids)  # not the compare run
    by_id = df.set_index("run_id")
    assert by_id.loc[ids[2], "k"] == 12.0 and math.isnan(by_id.loc[ids[1], "k"])
    assert by_id.loc[ids[0], "l0"] == 16.0 and math.isnan(by_id.loc[ids[0], "kl_sae"])
    assert set(df["kind"]) == {"quick", "full"}

    only = collect_analyses(["cmp"], "params.sae_architecture = 'standard'")
    assert list(only["run_id"]) == [ids[1]]
    assert len(collect_analyses(None)) == 3  # every experiment

    outcome = compare_and_log(["cmp"], "metrics.`sparsity/l0_mean` < 30", tmp_path / "out")
    assert sorted(outcome.table["run_id"]) == sorted([ids[0], ids[2]])
    assert outcome.table["pareto_loss_recovered"].tolist() == [True, True]
    run = client.get_run(outcome.run_id)
    assert run.data.params["filter"] == "metrics.`sparsity/l0_mean` < 30" and run.data.params["n_analyses"] == "2"
    assert run.data.metrics == {} and run.data.params["frontier_size_loss_recovered"] == "2"  # no metrics crowding the chart view
    assert run.info.experiment_id == client.get_experiment_by_name("cmp").experiment_id

    with pytest.raises(InputError, match="No quick or full analysis runs matching"):
        collect_analyses(["cmp"], "metrics.`sparsity/l0_mean` > 1000")
    with pytest.raises(InputError, match="not a valid MLflow search filter"):
        collect_analyses(["cmp"], "metrics.l0 >> 2")

    from sae_mlops.cli import app

    result = CliRunner().invoke(app, ["compare", "-e", "cmp", "--out", str(tmp_path / "cli"), "--no-track"])
    assert result.exit_code == 0, result.output
    assert "3 analyses" in result.output and (tmp_path / "cli" / "comparison.md").is_file()
    bad = CliRunner().invoke(app, ["compare", "-e", "cmp", "--filter", "nonsense ==="])
    assert bad.exit_code == 2 and "not a valid MLflow search filter" in bad.output


def test_compare_entrypoint(mlflow_store, tmp_path):
    ep = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["compare"]
    assert sorted(re.findall(r"\{(\w+)\}", ep["command"])) == sorted(ep["parameters"])
    spec = importlib.util.spec_from_file_location("entrypoint_compare", ROOT / "entrypoints" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(["--experiments", " a, b ", "--filter", "", "--out", ""])
    assert args.experiments == ["a", "b"] and args.filter is None and args.out is None
    assert module.main(["--experiments", "missing-exp", "--filter", "", "--out", str(tmp_path)]) == 2


def test_frontier_ignores_missing_quality():
    df = add_frontiers(pd.DataFrame({"l0": [1.0, 2.0], "loss_recovered": [np.nan, 0.5], "explained_variance": [0.1, 0.2]}))
    assert df["pareto_loss_recovered"].tolist() == [False, True]
    assert df["pareto_explained_variance"].tolist() == [True, True]


def test_filter_by_run_names_with_in(mlflow_store, tmp_path):
    """MLflow refuses ``attributes.run_name IN (...)``; compare accepts it (alone or ANDed)."""
    from sae_mlops.tracking.compare import collect_analyses
    from sae_mlops.tracking.runs import log_analysis

    a = log_analysis(_analysis("quick", 16.0, 0.9), [], tmp_path, experiment="names", run_name="alpha")
    b = log_analysis(_analysis("quick", 20.0, 0.9, arch="standard"), [], tmp_path, experiment="names", run_name="beta")
    log_analysis(_analysis("quick", 24.0, 0.9, arch="jumprelu"), [], tmp_path, experiment="names", run_name="gamma")
    got = collect_analyses(["names"], "attributes.run_name IN ('alpha', 'beta')")
    assert sorted(got["run_id"]) == sorted([a, b])
    got = collect_analyses(["names"], "metrics.`sparsity/l0_mean` > 18 AND attributes.run_name IN ('alpha', 'beta')")
    assert list(got["run_id"]) == [b]
