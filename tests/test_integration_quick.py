"""End to end: `mlflow run . -e quick` on the demo's standard SAE against a real sqlite store.

The run happens once per module (a module-scoped fixture); the tests then read it back with
MlflowClient and compare it with the results JSON the run logged as an artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sae_mlops.telemetry import PROGRESS_METRICS, QUICK_AFTER_RESULTS_JSON
from sae_mlops.tracking.runs import TIMINGS_ARTIFACT, split_timings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_TOKENS = 20000


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    # `mlflow run --env-manager local` runs `python entrypoints/quick.py`: make that this interpreter.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def demo_sae() -> Path:
    from sae_mlops.demo import demo_sae_path, ensure_demo_assets

    ensure_demo_assets()
    return Path(demo_sae_path("standard"))


@pytest.fixture(scope="module")
def launched(tmp_path_factory, demo_sae):
    tmp = tmp_path_factory.mktemp("mlflow_run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / "out"
    cmd = [
        str(BIN / "mlflow"), "run", str(ROOT), "-e", "quick",
        "-P", f"sae={demo_sae}", "-P", "model=demo", "-P", f"max_tokens={MAX_TOKENS}", "-P", f"out={out}",
        "--env-manager", "local", "--experiment-name", "t",
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=_env(uri), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"mlflow run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    jsons = [a.path for a in client.list_artifacts(run.info.run_id, "results") if a.path.endswith(".json")]
    assert sorted(Path(p).name for p in jsons) == ["analysis_results.json", "blocks.json"]  # blocks: the intervals' sums
    results = [p for p in jsons if p.endswith("analysis_results.json")]
    local = client.download_artifacts(run.info.run_id, results[0], str(tmp / "download"))
    return {"client": client, "run": run, "json": json.loads(Path(local).read_text()), "out": out, "tmp": tmp}


def test_run_finished_as_project_run(launched):
    run = launched["run"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "quick"
    assert run.data.tags["sae_mlops.kind"] == "quick"
    assert run.data.tags["sae_mlops.sae_hash"] == launched["json"]["params"]["sae_hash"]


def test_logged_metrics_equal_results_json(launched):
    metrics = launched["json"]["metrics"]
    # the run's metrics: the results JSON's, less the timing detail (timings.json), wall times in ms
    expected = {k: float(v) for k, v in split_timings(metrics)[0].items() if v is not None}
    logged = launched["run"].data.metrics
    assert not any(k.startswith(("time_cpu/", "time/pass/")) for k in logged)
    assert {k: v for k, v in logged.items() if k not in QUICK_AFTER_RESULTS_JSON + PROGRESS_METRICS} == expected
    assert set(QUICK_AFTER_RESULTS_JSON) <= set(logged)  # cost figures known only after the JSON was written
    nulls = {k for k, v in metrics.items() if v is None}
    logged_nulls = launched["run"].data.tags.get("sae_mlops.unlogged_metrics")
    assert set(logged_nulls.split(",")) == nulls if nulls else logged_nulls is None
    for key in ("sparsity/l0_mean", "recon/explained_variance", "downstream/ce_clean", "downstream/ce_sae", "downstream/ce_zero"):
        assert key in expected


def test_params_hold_hook_and_token_count(launched):
    params = launched["run"].data.params
    jp = launched["json"]["params"]
    # `mlflow run` logged hook='' (not given); the resolved hook is logged beside it.
    assert params["hook"] == "''"
    assert params["resolved.hook"] == jp["hook"] and jp["hook"].startswith("blocks.")
    assert params["max_tokens"] == str(MAX_TOKENS)
    assert params["tokens_analysed"] == str(jp["tokens_analysed"])
    assert 0 < int(params["tokens_analysed"]) <= MAX_TOKENS
    assert int(params["tokens_analysed"]) == launched["json"]["metrics"]["tokens/analysed"]
    assert "hook" in launched["run"].data.tags["sae_mlops.param_conflicts"].split(",")


def test_artifacts_are_the_written_files(launched):
    client, run, out = launched["client"], launched["run"], launched["out"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    logged = []
    stack = [None]
    while stack:
        for a in client.list_artifacts(run.info.run_id, stack.pop()):
            (stack if a.is_dir else logged).append(a.path)
    assert sorted(logged) == sorted([*written, TIMINGS_ARTIFACT])  # every file written, and the timing detail
    assert "SUMMARY.md" in written


def test_entrypoint_input_error_is_one_line_exit_2(tmp_path):
    env = _env(f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "quick.py"), "--sae", str(tmp_path / "no_such_sae"), "--out", str(tmp_path / "o")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no_such_sae" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert not (tmp_path / "o").exists()
