"""End to end on loopback: PostgreSQL, `mlflow server` (proxied artifacts, webhooks) and `sae-mlops serve`.

One stack per module: PostgreSQL from the installed binaries (`mlflow_servers.postgres_cluster`,
shared with the lineage tests), `mlflow server` on it with proxied artifacts and the webhook settings,
and the service as a subprocess that registers its own webhook. The tests run in order:

1. the service registered its webhook with MLflow;
2. a bad signature (and a stale timestamp) is refused and enqueues nothing;
3. registering a demo SAE version triggers a quick analysis: the run is linked to the version
   (lineage tags) and status, run id, metrics, gate and alias land on the version;
4. a delivery sent twice (same delivery id) makes one job; the service is SIGKILLed while that job
   runs (its analysis process dies with it), a version is registered while the service is down
   (MLflow's delivery fails), and after a restart the interrupted job completes (its killed
   attempt's run closed FAILED, one FINISHED run), the duplicate is still recognised, and the
   reconciler analyses the version the webhook missed.

Every wait is bounded; teardown stops everything (process groups) even after a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from mlflow_servers import free_port, postgres_cluster, postgres_missing
from service_stack import version_jobs_ended

pytestmark = pytest.mark.skipif(postgres_missing() is not None, reason=postgres_missing() or "")

BIN = Path(sys.executable).parent
MODEL = "sae-demo-saelens"
SECRET = "integration-test-secret"
MAX_TOKENS = 3000
ANALYSIS_TIMEOUT_S = 150.0


# --- processes -----------------------------------------------------------------------------------


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process started with start_new_session=True, and everything in its group."""
    if proc is None:
        return
    for s, wait in ((sig, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _kill_pid(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by init) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class ServiceProc:
    """`sae-mlops serve` as a subprocess; start() / kill() / stop() can be repeated."""

    def __init__(self, tmp: Path, tracking_uri: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp / "service"
        self.policy = tmp / "policy.yaml"
        self.policy.write_text(
            "rules:\n"
            f"  - models: ['sae-demo-*']\n"
            "    triggers: {created: true, tags: {analyze: '*'}}\n"
            f"    quick: {{max_tokens: {MAX_TOKENS}, batch_size: 8}}\n"
            "gate:\n"
            "  analysis: quick\n"
            "  alias: approved\n"
            "  min: {loss_recovered: 0.5}\n"
            "  max: {dead_fraction: 0.5}\n"
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SAE_MLOPS_"))}
        self.env.update({
            "MLFLOW_TRACKING_URI": tracking_uri,
            "SAE_MLOPS_WEBHOOK_SECRET": SECRET,
            "SAE_MLOPS_WEBHOOK_URL": f"{self.url}/webhooks/mlflow",
            "SAE_MLOPS_RECONCILE_INTERVAL_S": "600",  # the scan at start is the one under test
            "SAE_MLOPS_RETRY_BACKOFF_S": "1",
            "SAE_MLOPS_EXPERIMENT": "service-it",
            "SAE_MLOPS_LOG_FORMAT": "json",
            "SAE_MLOPS_DEVICES": "cpu",
        })
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"service-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [str(BIN / "sae-mlops"), "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                 "--policy", str(self.policy)],
                env=self.env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _wait_http(f"{self.url}/health", 60, self.proc, self.log_path)

    def kill(self) -> None:
        """SIGKILL the service process only (its job process must die with it by itself)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        _stop(self.proc)

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=5).json()

    def job(self, job_id: int) -> dict:
        return requests.get(f"{self.url}/jobs/{job_id}", timeout=5).json()

    def jobs(self) -> list[dict]:
        return requests.get(f"{self.url}/jobs", params={"limit": 1000}, timeout=5).json()["jobs"]

    def post(self, body: bytes, delivery_id: str, timestamp: int | None = None, secret: str = SECRET,
             signature: str | None = None) -> requests.Response:
        from mlflow.webhooks.delivery import _generate_hmac_signature  # MLflow's own signer

        ts = str(int(time.time()) if timestamp is None else timestamp)
        sig = signature or _generate_hmac_signature(secret, delivery_id, ts, body.decode())
        headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
                   "X-MLflow-Timestamp": ts, "X-MLflow-Signature": sig}
        return requests.post(f"{self.url}/webhooks/mlflow", data=body, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from cryptography.fernet import Fernet

    from sae_mlops.demo.assets import required_files

    if not all(p.is_file() for p in required_files()):
        pytest.skip("demo assets not built (python scripts/build_demo_assets.py)")
    tmp = tmp_path_factory.mktemp("service_it")
    mlflow_proc = None
    service = None
    job_pids: list[int] = []
    with postgres_cluster() as backend_uri:
        try:
            port = free_port()
            uri = f"http://127.0.0.1:{port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
            env.update({
                "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                "MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES": "0",  # a refused delivery fails at once
                "MLFLOW_WEBHOOK_CACHE_TTL": "1",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job consumers for a test server
            })
            mlflow_log = tmp / "mlflow-server.log"
            with open(mlflow_log, "ab") as logf:
                mlflow_proc = subprocess.Popen(
                    [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
                     "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1"],
                    cwd=tmp, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            _wait_http(f"{uri}/health", 120, mlflow_proc, mlflow_log)
            service = ServiceProc(tmp, uri)
            service.start()
            yield {"uri": uri, "service": service, "tmp": tmp, "mlflow_log": mlflow_log, "job_pids": job_pids}
        finally:
            if service is not None:
                service.stop()
            for pid in job_pids:
                _kill_pid(pid)
            _stop(mlflow_proc, timeout=5)  # a server holding PostgreSQL connections is slow to exit


@pytest.fixture(scope="module")
def client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack["uri"], registry_uri=stack["uri"])


def _register_demo_version(uri: str, client) -> str:
    """A new version of MODEL holding the demo SAELens SAE (`service_stack.register_demo_version`)."""
    from service_stack import register_demo_version

    return register_demo_version(client, MODEL)


def _wait_status(client, version: str, service: ServiceProc, timeout: float = ANALYSIS_TIMEOUT_S) -> dict:
    """The version's tags once its quick analysis status is set and its jobs have ended
    (`service_stack.version_jobs_ended`)."""
    deadline = time.monotonic() + timeout
    tags: dict = {}
    while time.monotonic() < deadline:
        tags = client.get_model_version(MODEL, version).tags
        if tags.get("sae_mlops.analysis.quick.status") in ("done", "failed") and version_jobs_ended(service, version):
            return tags
        time.sleep(1.0)
    raise AssertionError(f"version {version} not analysed within {timeout:.0f}s; tags: {tags}")


def _wait_job(service: ServiceProc, job_id: int, states: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = service.job(job_id)
        if job.get("state") in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states} within {timeout:.0f}s: {job}")


def _job_log(service: ServiceProc, job_id: int) -> str:
    d = service.data_dir / "jobs" / str(job_id)
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(d.glob("attempt-*.log")))


# --- tests ---------------------------------------------------------------------------------------


def test_service_registers_its_webhook(stack, client):
    service = stack["service"]
    deadline = time.monotonic() + 30
    hooks = []
    while time.monotonic() < deadline:
        hooks = [h for h in client.list_webhooks() if h.name == "sae-mlops"]
        if hooks:
            break
        time.sleep(0.5)
    assert len(hooks) == 1, hooks
    assert hooks[0].url == f"{service.url}/webhooks/mlflow"
    assert {str(e) for e in hooks[0].events} >= {"model_version.created", "model_version_tag.set"}
    health = service.health()
    assert health["status"] == "ok" and health["workers"][0]["alive"]


def test_bad_signature_is_refused_and_enqueues_nothing(stack):
    service = stack["service"]
    before = service.health()["queue"]
    body = json.dumps({"entity": "model_version", "action": "created", "timestamp": "x",
                       "data": {"name": MODEL, "version": "1", "source": "x", "run_id": None, "tags": {}, "description": None}}).encode()
    r = service.post(body, str(uuid.uuid4()), secret="wrong-secret")
    assert r.status_code == 401 and r.json()["reason"] == "bad_signature"
    r = service.post(body, str(uuid.uuid4()), signature="v1,AAAA")
    assert r.status_code == 401
    r = service.post(body, str(uuid.uuid4()), timestamp=int(time.time()) - 3600)
    assert r.status_code == 401 and r.json()["reason"] == "stale_timestamp"
    r = requests.post(f"{service.url}/webhooks/mlflow", data=body, timeout=5)
    assert r.status_code == 400
    assert service.health()["queue"] == before
    assert service.jobs() == []


def test_registering_a_version_triggers_a_linked_quick_analysis(stack, client):
    service = stack["service"]
    version = _register_demo_version(stack["uri"], client)
    assert version == "1"
    tags = _wait_status(client, version, service)
    jobs = service.jobs()
    assert tags["sae_mlops.analysis.quick.status"] == "done", (tags, jobs, _job_log(service, jobs[0]["id"]) if jobs else "")
    assert len(jobs) == 1 and jobs[0]["trigger"] == "model_version.created" and jobs[0]["state"] == "done"

    run_id = tags["sae_mlops.analysis.quick.run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # The analysis loaded models:/<name>/<version> and recorded where the SAE came from.
    assert run.data.tags["sae_mlops.source_model_name"] == MODEL
    assert run.data.tags["sae_mlops.source_model_version"] == version
    assert run.data.tags["sae_mlops.source_uri"] == f"models:/{MODEL}/{version}"
    assert run.data.tags["sae_mlops.service.job_id"] == str(jobs[0]["id"])
    assert run.data.params["max_tokens"] == str(MAX_TOKENS)
    assert client.get_experiment(run.info.experiment_id).name == "service-it"
    # Headline metrics on the version equal the run's.
    m = run.data.metrics
    assert float(tags["sae_mlops.analysis.quick.loss_recovered"]) == pytest.approx(m["downstream/loss_recovered"], rel=1e-5)
    assert float(tags["sae_mlops.analysis.quick.l0"]) == pytest.approx(m["sparsity/l0_mean"], rel=1e-5)
    assert float(tags["sae_mlops.analysis.quick.explained_variance"]) == pytest.approx(m["recon/explained_variance"], rel=1e-5)
    assert float(tags["sae_mlops.analysis.quick.dead_fraction"]) == pytest.approx(m["features/dead_fraction"], rel=1e-5, abs=1e-9)
    # The gate holds for the demo SAE, so the alias points at this version.
    assert tags["sae_mlops.analysis.gate"] == "passed", tags
    assert client.get_model_version_by_alias(MODEL, "approved").version == version
    # Our own tag writes came back as webhooks and were ignored: still exactly one job.
    time.sleep(1.0)
    assert len(service.jobs()) == 1


def test_duplicate_delivery_kill_restart_and_reconcile(stack, client):
    service: ServiceProc = stack["service"]
    # A signed tag-set delivery asking for a new analysis of v1, delivered twice.
    delivery_id = str(uuid.uuid4())
    body = json.dumps({"entity": "model_version_tag", "action": "set", "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": MODEL, "version": "1", "key": "analyze", "value": "again"}}).encode()
    ts = int(time.time())
    first = service.post(body, delivery_id, timestamp=ts)
    assert first.status_code == 202, first.text
    (job,) = first.json()["jobs"]
    assert job["created"]
    job_id = job["id"]
    second = service.post(body, delivery_id, timestamp=ts)
    assert second.status_code == 200 and second.json()["status"] == "duplicate"
    assert len([j for j in service.jobs() if j["version"] == "1"]) == 2  # created + this one

    # Kill the service while the job's analysis process is running.
    running = _wait_job(service, job_id, ("running",), 120)  # queued behind v1's first job on a loaded machine
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not running.get("pid"):
        time.sleep(0.2)
        running = service.job(job_id)
    job_pid = running["pid"]
    assert job_pid, running
    stack["job_pids"].append(job_pid)
    assert _pid_alive(job_pid), service.job(job_id)  # the analysis is still importing or loading
    service.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _pid_alive(job_pid):
        time.sleep(0.2)
    assert not _pid_alive(job_pid), "the analysis process outlived the service"

    # Register v2 while the service is down: MLflow's delivery fails (and is not retried).
    log_before = stack["mlflow_log"].read_text(errors="replace")
    version2 = _register_demo_version(stack["uri"], client)
    assert version2 == "2"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = stack["mlflow_log"].read_text(errors="replace")[len(log_before):]
        if "webhook" in new.lower() and "fail" in new.lower():
            break
        time.sleep(0.3)
    else:
        pytest.fail("MLflow did not report the failed webhook delivery")
    assert "sae_mlops.analysis.quick.status" not in client.get_model_version(MODEL, version2).tags

    service.start()
    health = service.health()
    assert job_id in health["requeued_at_start"]
    # The delivery ids survived the restart.
    again = service.post(body, delivery_id, timestamp=ts)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"

    done = _wait_job(service, job_id, ("done", "failed"), ANALYSIS_TIMEOUT_S)
    assert done["state"] == "done", (done, _job_log(service, job_id))
    assert done["attempts"] == 2  # the killed attempt, then the one that completed
    # Exactly once in MLflow: one FINISHED run (the retry's); the killed attempt's run, if it had
    # created one yet, was closed FAILED; none is left RUNNING.
    exp = client.get_experiment_by_name("service-it")
    runs = client.search_runs([exp.experiment_id], f"tags.`sae_mlops.service.job_id` = '{job_id}'")
    statuses = [(r.info.run_id, r.info.status) for r in runs]
    assert [r for r, st in statuses if st == "FINISHED"] == [done["run_id"]], statuses
    assert {st for _, st in statuses} <= {"FINISHED", "FAILED"} and len(runs) <= 2, statuses
    tags1 = client.get_model_version(MODEL, "1").tags
    assert tags1["sae_mlops.analysis.quick.status"] == "done"
    assert tags1["sae_mlops.analysis.quick.run_id"] == done["run_id"]
    assert tags1["sae_mlops.analysis.quick.job_id"] == str(job_id)

    # The reconciler found v2 (the webhook never reached the service) and analysed it.
    tags2 = _wait_status(client, version2, service)
    jobs2 = [j for j in service.jobs() if j["version"] == version2]
    assert len(jobs2) == 1 and jobs2[0]["trigger"] == "reconcile", jobs2
    assert tags2["sae_mlops.analysis.quick.status"] == "done", (tags2, _job_log(service, jobs2[0]["id"]))
    run2 = client.get_run(tags2["sae_mlops.analysis.quick.run_id"])
    assert run2.data.tags["sae_mlops.source_model_version"] == version2
    # Still one job per delivery: v1 has its created job and the tag-triggered one.
    assert len([j for j in service.jobs() if j["version"] == "1"]) == 2
    assert service.health()["queue"]["depth"] == 0
