"""The Typer CLI: help text, and user mistakes as one red line with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.config import AnalysisConfig
from sae_mlops.errors import InputError
from sae_mlops.workflows import default_out_dir, sae_label

runner = CliRunner()

QUICK_OPTIONS = [
    "--sae", "--sae-id", "--model", "--corpus", "--text-field", "--hook", "--max-tokens", "--context-size",
    "--batch-size", "--prepend-bos", "--no-prepend-bos", "--topk-mode", "--threshold", "--rare-threshold",
    "--dense-threshold", "--device", "--dtype", "--out", "--experiment", "--run-name", "--no-track", "--quiet",
]


def test_app_help():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0, r.output
    for word in ("quick", "demo", "--verbose"):
        assert word in r.output


def test_quick_help_lists_every_option_with_defaults():
    r = runner.invoke(app, ["quick", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for opt in QUICK_OPTIONS:
        assert opt in r.output, opt
    assert "1000000" in r.output  # token budget default
    assert "batch|threshold" in r.output
    assert "analysis/<sae dir name>/quick_<UTC timestamp>" in r.output


def test_demo_help():
    r = runner.invoke(app, ["demo", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "sae-mlops-demo" in r.output


def test_console_script_help_is_fast_and_light():
    """`sae-mlops --help` must not import torch or mlflow."""
    code = "import sys; from sae_mlops.cli import app; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("user_value,want", [(None, "False"), ("1", "True")])
def test_the_command_turns_numpy_huge_page_requests_off_unless_the_user_set_them(user_value, want):
    """The console script sets NUMPY_MADVISE_HUGEPAGE=0 before numpy is imported (first touches of
    large arrays stalled on memory compaction), so numpy and the processes it starts run without
    huge-page requests; a value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if user_value is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = user_value
    code = ("import os; from sae_mlops.cli import app; import numpy; "
            "print(numpy._core.multiarray._set_madvise_hugepage(True), os.environ['NUMPY_MADVISE_HUGEPAGE'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == [want, user_value or "0"]


@pytest.fixture()
def failing_run_quick(monkeypatch):
    import sae_mlops.analyses.quick

    seen = {}

    def boom(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise InputError("the SAE directory 'nope' does not exist;\n pass --sae with an existing directory.")

    monkeypatch.setattr(sae_mlops.analyses.quick, "run_quick", boom)
    return seen


def test_input_error_is_one_line_exit_2(failing_run_quick, tmp_path):
    r = runner.invoke(app, ["quick", "--sae", "nope", "--out", str(tmp_path / "o"), "--no-track"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "the SAE directory 'nope' does not exist; pass --sae with an existing directory." in lines[0]
    assert r.stdout.strip() == ""
    assert not (tmp_path / "o").exists()  # nothing written for a failed analysis


def test_options_reach_the_config(failing_run_quick, tmp_path):
    args = [
        "quick", "--sae", "s", "--sae-id", "i", "--model", "gpt2", "--corpus", "c.json", "--text-field", "body",
        "--hook", "blocks.0.hook_resid_post", "--max-tokens", "500", "--context-size", "64", "--batch-size", "4",
        "--no-prepend-bos", "--topk-mode", "threshold", "--threshold", "0.5", "--rare-threshold", "1e-4",
        "--dense-threshold", "0.2", "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path), "--no-track",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    cfg = failing_run_quick["cfg"]
    assert cfg == AnalysisConfig(
        sae="s", sae_id="i", model="gpt2", corpus="c.json", text_field="body", hook="blocks.0.hook_resid_post",
        max_tokens=500, context_size=64, batch_size=4, prepend_bos=False, topk_mode="threshold", threshold=0.5,
        rare_threshold=1e-4, dense_threshold=0.2, device="cpu", dtype="float16",
    )


def test_tri_state_prepend_bos_defaults_to_none(failing_run_quick):
    runner.invoke(app, ["quick", "--sae", "s", "--no-track"])
    assert failing_run_quick["cfg"].prepend_bos is None
    assert failing_run_quick["cfg"].topk_mode is None
    runner.invoke(app, ["quick", "--sae", "s", "--prepend-bos", "--no-track"])
    assert failing_run_quick["cfg"].prepend_bos is True


def test_bad_option_value_is_a_usage_error():
    r = runner.invoke(app, ["quick", "--sae", "s", "--topk-mode", "sideways"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output


def test_default_out_dir():
    cfg = AnalysisConfig(sae="/data/saes/Qwen.blocks.9.hook_resid_post.btop128sae/")
    out = default_out_dir(cfg)
    assert out.parent == Path("analysis/Qwen.blocks.9.hook_resid_post.btop128sae")
    assert out.name.startswith("quick_") and out.name.endswith("Z")
    assert sae_label("runs:/0123abc/sae") == "runs_0123abc_sae"
    assert sae_label("models:/my-sae@prod") == "models_my-sae_prod"
    assert sae_label("gpt2-small-res-jb", "blocks.8.hook_resid_pre") == "gpt2-small-res-jb__blocks.8.hook_resid_pre"


def test_demo_end_to_end(tmp_path, monkeypatch):
    """`sae-mlops demo` on a small budget: three tracked runs and the `mlflow ui` line."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking_utils = mlflow.tracking._tracking_service.utils
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # the env var decides

    r = runner.invoke(app, ["demo", "--max-tokens", "2000", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"mlflow ui --backend-store-uri {uri}" in r.stdout
    # intervals: every headline figure as value ± half-width, in each SAE's table and in the summary
    assert "Demo results (± half-width of the 95 % interval)" in r.stdout and r.stdout.count(" ± ") >= 9
    assert "sae-mlops compare -e sae-mlops-demo" in r.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sae-mlops-demo")
    runs = client.search_runs([exp.experiment_id])
    names = sorted(run.info.run_name for run in runs)  # <kind> · <SAE name> · <architecture> d<d_sae> k<k>
    assert [n.split(" · ")[:2] for n in names] == [["quick", "sae_batchtopk"], ["quick", "sae_saelens"], ["quick", "sae_standard"]]
    assert names[1].endswith("topk d512 k16") and names[2].endswith("standard d512")
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["model"] == "demo"
        assert int(run.data.params["tokens_analysed"]) == 2000
        assert run.data.metrics["tokens/analysed"] == 2000
        m = run.data.metrics
        assert m["downstream/loss_recovered_ci_low"] <= m["downstream/loss_recovered"] <= m["downstream/loss_recovered_ci_high"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "results")} >= {"results/blocks.json", "results/blocks.safetensors"}
    assert len(list((tmp_path / "analysis").glob("sae_*/quick_*/results/analysis_results.json"))) == 3
