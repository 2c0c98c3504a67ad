"""End to end: `mlflow run . -e full` on the demo's BatchTopK SAE against a real sqlite store.

The run happens once per module (a module-scoped fixture); the tests read it back with MlflowClient:
status, metrics against the logged results JSON, the artifact layout, and the SUMMARY and
feature-summary files against the prior tool's keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sae_mlops.telemetry import AFTER_RESULTS_JSON, PROGRESS_METRICS
from sae_mlops.tracking.runs import TIMINGS_ARTIFACT, split_timings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_TOKENS = 8000

SUMMARY_KEYS = {
    "timestamp", "model", "sae_path", "layer", "hook_name", "dataset_size", "n_tokens_processed", "n_features",
    "sparsity", "dead_features", "reconstruction", "ablation", "top_features", "files",
}
FEATURE_KEYS = {"feature", "activation_frequency", "mean_activation", "top_examples"}
EXAMPLE_KEYS = {"token", "activation", "context", "position", "text_idx", "global_idx"}


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    # `mlflow run --env-manager local` runs `python entrypoints/full.py`: make that this interpreter.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _all_artifacts(client: MlflowClient, run_id: str) -> list[str]:
    found, stack = [], [None]
    while stack:
        for a in client.list_artifacts(run_id, stack.pop()):
            (stack if a.is_dir else found).append(a.path)
    return sorted(found)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from sae_mlops.demo import demo_sae_path, ensure_demo_assets

    ensure_demo_assets()
    tmp = tmp_path_factory.mktemp("mlflow_full")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / "out"
    cmd = [
        str(BIN / "mlflow"), "run", str(ROOT), "-e", "full",
        "-P", f"sae={demo_sae_path('batchtopk')}", "-P", "model=demo", "-P", f"max_tokens={MAX_TOKENS}", "-P", f"out={out}",
        "--env-manager", "local", "--experiment-name", "t",
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=_env(uri), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"mlflow run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    artifacts = _all_artifacts(client, run.info.run_id)
    dl = tmp / "download"

    def fetch(prefix: str, suffix: str) -> Path:
        (path,) = [a for a in artifacts if a.startswith(prefix) and a.endswith(suffix)]
        return Path(client.download_artifacts(run.info.run_id, path, str(dl)))

    return {
        "client": client,
        "run": run,
        "out": out,
        "artifacts": artifacts,
        "results": json.loads(fetch("results/analysis_results", ".json").read_text()),
        "summary": json.loads(fetch("SUMMARY", ".json").read_text()),
        "features": [json.loads(ln) for ln in fetch("results/feature_summaries", ".jsonl").read_text().splitlines() if ln.strip()],
    }


def test_run_finished_as_full_project_run(launched):
    run = launched["run"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "full"
    assert run.data.tags["sae_mlops.kind"] == "full"
    assert run.data.params["max_tokens"] == str(MAX_TOKENS)
    assert int(run.data.params["tokens_analysed"]) == MAX_TOKENS


def test_logged_metrics_equal_results_json(launched):
    metrics = launched["results"]["metrics"]
    # the run's metrics: the results JSON's, less the timing detail (timings.json), wall times in ms
    expected = {k: float(v) for k, v in split_timings(metrics)[0].items() if v is not None}
    logged = launched["run"].data.metrics
    assert not any(k.startswith(("time_cpu/", "time/pass/")) for k in logged)
    assert {k: v for k, v in logged.items() if k not in AFTER_RESULTS_JSON + PROGRESS_METRICS} == expected
    assert set(AFTER_RESULTS_JSON) <= set(logged)  # cost figures known only after the JSON was written
    for key in ("sparsity/l0_mean", "recon/explained_variance", "recon/explained_variance_pooled", "recon/cosine",
                "recon/l2_ratio", "downstream/ce_sae", "downstream/loss_recovered"):
        assert key in expected, key


def test_artifacts_have_the_output_layout(launched):
    artifacts, out = launched["artifacts"], launched["out"]
    # every output file at its path; the plots also as MLflow images (under images/)
    written = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert [a for a in artifacts if not a.startswith("images/")] == sorted([*written, TIMINGS_ARTIFACT])
    assert any(a.startswith("images/l0_histogram") for a in artifacts)

    def one(prefix: str, suffix: str) -> None:
        assert len([a for a in artifacts if a.startswith(prefix) and a.endswith(suffix)]) == 1, (prefix, suffix)

    one("SUMMARY.json", "")
    one("README.md", "")
    one("README.html", "")
    one("results/feature_summaries.jsonl", "")
    one("matrices/feature_similarity.npy", "")
    one("matrices/feature_cooccurrence.npy", "")
    one("plots/l0_histogram", ".png")
    one("activation_database/activation_db/", "manifest.json")
    assert not any(".partial" in a for a in artifacts)


def test_summary_has_the_prior_tools_keys(launched):
    summary = launched["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n_tokens_processed"] == MAX_TOKENS
    assert summary["model"] == "demo" and summary["hook_name"] == "blocks.0.hook_resid_post"
    assert summary["n_features"] == int(launched["results"]["params"]["d_sae"])


def test_feature_summary_lines(launched):
    lines = launched["features"]
    assert 0 < len(lines) <= launched["summary"]["n_features"]
    for line in lines:
        assert FEATURE_KEYS <= set(line), line.keys()
        assert line["top_examples"], line["feature"]
        for ex in line["top_examples"]:
            assert EXAMPLE_KEYS <= set(ex), ex.keys()
        acts = [ex["activation"] for ex in line["top_examples"]]
        assert acts == sorted(acts, reverse=True)


def test_entrypoint_input_error_is_one_line_exit_2(tmp_path):
    env = _env(f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "entrypoints" / "full.py"), "--sae", str(tmp_path / "no_such_sae"), "--neighbours", "4",
         "--out", str(tmp_path / "o")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ") and "no_such_sae" in proc.stderr
    assert not (tmp_path / "o").exists()
