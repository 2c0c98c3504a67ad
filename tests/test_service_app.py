"""The service without MLflow: HTTP endpoints, workers (real subprocesses running a stand-in job),
retries, timeouts, write-back, reconciler and settings. The registry is a recording fake."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sae_mlops.errors import InputError
from sae_mlops.service.mlflow_io import VersionInfo, VersionMissing
from sae_mlops.service.policy import JobRequest, parse_policy
from sae_mlops.service.service import Service
from sae_mlops.service.settings import Settings, load_settings
from sae_mlops.service.signature import sign

SECRET = "unit-secret"
LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.7", 50000)

# Stands in for `python -m sae_mlops.service.job`: behaviour from options["behaviour"].
FAKE_JOB = textwrap.dedent(
    """
    import json, os, pathlib, sys, time
    spec = json.load(open(sys.argv[1]))
    b = spec["options"].get("behaviour", "ok")
    marker = pathlib.Path(spec["result_path"]).parent / "runs"
    n = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(n))
    print("attempt", n, "of", spec["model_name"], spec["version"], "on", spec["device"], flush=True)
    if b == "crash" or (b == "crash_once" and n == 1):
        print("Traceback (most recent call last):\\nRuntimeError: boom", flush=True)
        sys.exit(1)
    if b == "input_error":
        print("The SAE is broken; fix it.", flush=True)
        sys.exit(2)
    if b == "sleep":
        time.sleep(60)
    if b == "oom":
        os.kill(os.getpid(), 9)
    if b == "no_result":
        sys.exit(0)
    if b == "unavailable_once" and n == 1:
        print("tracking server unavailable: ConnectionError", flush=True)
        sys.exit(75)
    if b == "denied":
        sys.exit(77)
    pathlib.Path(spec["out_dir"]).mkdir(parents=True, exist_ok=True)
    json.dump({"run_id": "run-%s" % spec["job_id"], "kind": spec["kind"],
               "metrics": {"downstream/loss_recovered": 0.9, "features/dead_fraction": 0.01,
                           "sparsity/l0_mean": 12.0}}, open(spec["result_path"], "w"))
    """
)


def fake_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-c", FAKE_JOB, str(spec_path)]


class FakeRegistry:
    """Records what the service would write to MLflow."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple] = []
        self.versions: list[VersionInfo] = []
        self.missing: set[tuple[str, str]] = set()
        self.fail_writes = 0
        self.fail_running: list[BaseException] = []  # raised by mark_running, one per call

    def _rec(self, *call) -> None:
        with self.lock:
            self.calls.append(call)

    def of(self, kind: str) -> list[tuple]:
        with self.lock:
            return [c for c in self.calls if c[0] == kind]

    def mark_running(self, name, version, kind, job_id):
        with self.lock:
            if self.fail_running:
                e = self.fail_running.pop(0)
                self.fail_running.insert(0, e) if getattr(e, "sticky", False) else None
                raise e
        if (name, version) in self.missing:
            raise VersionMissing(f"{name} v{version} does not exist in the registry")
        self._rec("running", name, version, kind, job_id)

    def write_done(self, name, version, kind, job_id, run_id, metrics, gate=None):
        with self.lock:
            if self.fail_writes > 0:
                self.fail_writes -= 1
                raise ConnectionError("MLflow is down")
        result = gate.evaluate(metrics) if gate is not None and gate.analysis == kind else None
        self._rec("done", name, version, kind, job_id, run_id, result.passed if result else None)
        return result

    def write_failed(self, name, version, kind, job_id, error):
        self._rec("failed", name, version, kind, job_id, error)

    def iter_versions(self, policy):
        yield from [v for v in self.versions if policy.matches_model(v.name)]

    def ensure_webhook(self, name, url, secret, events):
        self._rec("webhook", name, url, secret, tuple(events))
        return "wh-1"

    def tag_run(self, run_id, tags):
        self._rec("tag_run", run_id, dict(tags))

    def close_job_runs(self, experiment, job_key, keep=None):
        self._rec("close_runs", experiment, job_key)
        return []


POLICY = {
    "rules": [{"models": ["sae-*"], "triggers": {"created": True, "tags": {"analyze": "*"}}, "quick": {"max_tokens": 100}}],
    "gate": {"analysis": "quick", "alias": "approved", "min": {"loss_recovered": 0.5}},
}


@pytest.fixture
def make_service(tmp_path):
    made: list[Service] = []

    def make(registry: FakeRegistry | None = None, policy=None, **overrides) -> Service:
        values = {
            "data_dir": tmp_path / "svc",
            "webhook_secret": SECRET,
            "reconcile_interval_s": 0.0,
            "retry_backoff_s": 0.05,
            "worker_poll_s": 0.1,
            "devices": ["cpu"],
            "quick_timeout_s": 60.0,
        }
        values.update(overrides)
        reg = registry or FakeRegistry()
        svc = Service(Settings(**values), parse_policy(policy or POLICY), registry_factory=lambda uri: reg, job_command=fake_command)
        svc.fake = reg  # type: ignore[attr-defined]
        made.append(svc)
        return svc

    yield make
    for svc in made:
        if svc.queue is not None:
            svc.stop(timeout=20)


def wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def wait_job(svc: Service, job_id: int, states=("done", "failed"), timeout=20.0):
    return wait_for(lambda: (j := svc.queue.get(job_id)) and j.state in states and j, timeout, f"job {job_id} in {states}")


def delivery(event="model_version.created", data=None, delivery_id=None, ts=None, secret=SECRET):
    entity, action = event.rsplit(".", 1)
    body = json.dumps({"entity": entity, "action": action, "timestamp": "now",
                       "data": data or {"name": "sae-a", "version": "1"}}).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if ts is None else ts)
    headers = {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": sign(secret, delivery_id, ts, body), "Content-Type": "application/json"}
    return headers, body


def enqueue(svc: Service, version="1", behaviour="ok", name="sae-a", force=False) -> int:
    r = svc.queue.enqueue(JobRequest(name, version, "quick", {"behaviour": behaviour}, "test", force))
    svc.wake()
    return r.job_id


# --- HTTP ------------------------------------------------------------------------------------------


def test_http_webhook_to_write_back(make_service):
    from sae_mlops.service.app import create_app

    svc = make_service()
    with TestClient(create_app(svc), client=LOOPBACK) as http:
        h = http.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["workers"][0]["device"] == "cpu"

        headers, body = delivery()
        r = http.post("/webhooks/mlflow", content=body, headers=headers)
        assert r.status_code == 202, r.text
        (job,) = r.json()["jobs"]
        assert job["created"]
        dup = http.post("/webhooks/mlflow", content=body, headers=headers)
        assert dup.status_code == 200 and dup.json()["status"] == "duplicate"

        done = wait_job(svc, job["id"])
        assert done.state == "done" and done.run_id == f"run-{job['id']}" and done.attempts == 1
        assert done.result["gate"] == {"passed": True, "reasons": []}
        assert svc.fake.of("running") == [("running", "sae-a", "1", "quick", job["id"])]
        assert svc.fake.of("done") == [("done", "sae-a", "1", "quick", job["id"], f"run-{job['id']}", True)]
        assert not (svc.settings.jobs_dir / str(job["id"]) / "out").exists()  # outputs removed after logging
        assert (svc.settings.jobs_dir / str(job["id"]) / "attempt-1.log").read_text().startswith("attempt 1")

        assert http.get(f"/jobs/{job['id']}").json()["state"] == "done"
        assert [j["id"] for j in http.get("/jobs", params={"state": "done"}).json()["jobs"]] == [job["id"]]
        assert http.get("/jobs/999").status_code == 404
        assert http.get("/jobs", params={"state": "bogus"}).status_code == 400
        health = http.get("/health").json()
        assert health["queue"] == {"depth": 0, "queued": 0, "running": 0, "done": 1, "failed": 0}
        assert health["workers"][0]["jobs_done"] == 1


def test_http_refusals_enqueue_nothing(make_service):
    svc = make_service()
    from sae_mlops.service.app import create_app

    with TestClient(create_app(svc), client=LOOPBACK) as http:
        headers, body = delivery(secret="wrong")
        assert http.post("/webhooks/mlflow", content=body, headers=headers).status_code == 401
        headers, body = delivery(ts=int(time.time()) - 3600)
        r = http.post("/webhooks/mlflow", content=body, headers=headers)
        assert r.status_code == 401 and r.json()["reason"] == "stale_timestamp"
        assert http.post("/webhooks/mlflow", content=body).status_code == 400  # no headers
        headers, _ = delivery()
        junk = b"not json"
        ts, did = headers["X-MLflow-Timestamp"], headers["X-MLflow-Delivery-Id"]
        headers["X-MLflow-Signature"] = sign(SECRET, did, ts, junk)
        assert http.post("/webhooks/mlflow", content=junk, headers=headers).status_code == 400
        headers, _ = delivery()
        big = b"x" * 1_000_001
        assert http.post("/webhooks/mlflow", content=big, headers=headers).status_code == 413
        assert svc.queue.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0}
        # A refused delivery id is not burnt: the genuine delivery with that id still works.
        assert not svc.queue.seen_delivery(did)


def test_ignored_events_are_acknowledged(make_service):
    svc = make_service()
    svc.open()
    code, body = svc.handle_webhook(*delivery("model_version_tag.set",
                                              {"name": "sae-a", "version": "1", "key": "sae_mlops.analysis.quick.status", "value": "done"}))
    assert code == 200 and body["status"] == "ignored"
    code, body = svc.handle_webhook(*delivery(data={"name": "resnet", "version": "1"}))
    assert code == 200 and body["status"] == "ignored"
    code, body = svc.handle_webhook(*delivery("registered_model.created", {"name": "sae-a"}))
    assert code == 200 and body["status"] == "ignored"
    assert svc.queue.list() == []


def test_tag_trigger_reanalyses_but_created_does_not(make_service):
    svc = make_service()
    svc.start()
    code, body = svc.handle_webhook(*delivery())
    first = body["jobs"][0]["id"]
    wait_job(svc, first)
    code, body = svc.handle_webhook(*delivery())  # another created delivery for the same version
    assert code == 202 and body["jobs"] == [{"id": first, "created": False, "reason": "done"}]
    code, body = svc.handle_webhook(*delivery("model_version_tag.set", {"name": "sae-a", "version": "1", "key": "analyze", "value": "1"}))
    assert code == 202 and body["jobs"][0]["created"] and body["jobs"][0]["id"] != first
    assert wait_job(svc, body["jobs"][0]["id"]).state == "done"


# --- workers ---------------------------------------------------------------------------------------


def test_crash_is_retried_then_done(make_service):
    svc = make_service()
    svc.start()
    jid = enqueue(svc, behaviour="crash_once")
    job = wait_job(svc, jid)
    assert job.state == "done" and job.attempts == 2
    logs = sorted(p.name for p in (svc.settings.jobs_dir / str(jid)).glob("attempt-*.log"))
    assert logs == ["attempt-1.log", "attempt-2.log"]
    assert svc.fake.of("failed") == []


def test_bounded_retries_then_failed_and_written_back(make_service):
    svc = make_service(max_attempts=3)
    svc.start()
    jid = enqueue(svc, behaviour="crash")
    job = wait_job(svc, jid)
    assert job.state == "failed" and job.attempts == 3
    assert "exit code 1" in job.error and "RuntimeError: boom" in job.error
    (call,) = wait_for(lambda: svc.fake.of("failed"), what="failure written back")
    assert call[1:5] == ("sae-a", "1", "quick", jid) and "boom" in call[5]


def test_input_error_is_not_retried(make_service):
    svc = make_service(max_attempts=3)
    svc.start()
    job = wait_job(svc, enqueue(svc, behaviour="input_error"))
    assert job.state == "failed" and job.attempts == 1 and "The SAE is broken" in job.error
    assert len(wait_for(lambda: svc.fake.of("failed"), what="failure written back")) == 1


def test_killed_job_process_does_not_take_the_service_down(make_service):
    svc = make_service(max_attempts=1)
    svc.start()
    job = wait_job(svc, enqueue(svc, behaviour="oom"))
    assert job.state == "failed" and "killed by SIGKILL (out of memory?)" in job.error
    assert svc.health()[1]["status"] == "ok"
    assert wait_job(svc, enqueue(svc, version="2")).state == "done"  # the next job still runs


def test_timeout_kills_the_job(make_service):
    svc = make_service(max_attempts=1, quick_timeout_s=1.0)
    svc.start()
    t0 = time.monotonic()
    job = wait_job(svc, enqueue(svc, behaviour="sleep"), timeout=30)
    assert job.state == "failed" and "timed out after 1s" in job.error
    assert time.monotonic() - t0 < 20


def test_exit_zero_without_result_is_a_failure(make_service):
    svc = make_service(max_attempts=1)
    svc.start()
    job = wait_job(svc, enqueue(svc, behaviour="no_result"))
    assert job.state == "failed" and "without writing result.json" in job.error


def test_result_of_an_earlier_attempt_is_written_back_without_rerunning(make_service):
    svc = make_service()
    svc.open()
    jid = enqueue(svc)
    d = svc.settings.jobs_dir / str(jid)
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"run_id": "run-earlier", "metrics": {"downstream/loss_recovered": 0.2}}))
    svc.start()
    job = wait_job(svc, jid)
    assert job.state == "done" and job.run_id == "run-earlier"
    assert not (d / "runs").exists()  # the analysis did not run again
    assert svc.fake.of("done")[0][-1] is False  # gate failed on loss_recovered 0.2


def test_write_back_failure_is_retried_without_using_attempts(make_service):
    reg = FakeRegistry()
    reg.fail_writes = 2
    svc = make_service(reg, max_attempts=1)
    svc.start()
    jid = enqueue(svc)
    job = wait_job(svc, jid)
    assert job.state == "done" and job.attempts == 1
    assert (svc.settings.jobs_dir / str(jid) / "runs").read_text() == "1"  # analysed once


def test_missing_version_fails_without_running(make_service):
    reg = FakeRegistry()
    reg.missing.add(("sae-a", "9"))
    svc = make_service(reg)
    svc.start()
    jid = enqueue(svc, version="9")
    job = wait_job(svc, jid)
    assert job.state == "failed" and "does not exist" in job.error and job.attempts == 1
    assert not (svc.settings.jobs_dir / str(jid) / "runs").exists()


def test_graceful_stop_requeues_the_running_job(make_service):
    svc = make_service()
    svc.start()
    jid = enqueue(svc, behaviour="sleep")
    wait_for(lambda: (j := svc.queue.get(jid)) and j.pid, what="job process started")
    path = svc.settings.queue_path
    svc.stop(timeout=30)
    from sae_mlops.service.queue import JobQueue

    q = JobQueue(path)
    job = q.get(jid)
    assert job.state == "queued" and job.attempts == 0 and "shut down" in job.error
    assert ("close_runs", svc.settings.experiment, q.job_key(jid)) in svc.fake.calls  # its run is not left RUNNING


def test_restart_requeues_and_completes(make_service, tmp_path):
    svc = make_service()
    svc.open()
    jid = enqueue(svc)
    svc.queue.claim("worker-dead")  # as if a killed service had been running it
    svc.stop()
    svc2 = make_service()
    svc2.start()
    assert svc2.requeued_at_start == [jid]
    job = wait_job(svc2, jid)
    assert job.state == "done" and job.attempts == 2


def test_one_service_per_data_dir(make_service):
    a = make_service()
    a.open()
    with pytest.raises(InputError, match="Another sae-mlops service"):
        make_service().open()


# --- reconciler ------------------------------------------------------------------------------------


def test_reconciler_enqueues_what_the_webhooks_missed(make_service):
    reg = FakeRegistry()
    reg.versions = [
        VersionInfo("sae-a", "1", "READY", {}),  # never analysed
        VersionInfo("sae-a", "2", "READY", {"sae_mlops.analysis.quick.status": "done"}),
        VersionInfo("sae-a", "3", "READY", {"sae_mlops.analysis.quick.status": "failed"}),
        VersionInfo("sae-a", "4", "READY", {"sae_mlops.analysis.quick.status": "running"}),  # a lost queue's leftover
        VersionInfo("sae-a", "5", "PENDING_REGISTRATION", {}),
        VersionInfo("resnet", "1", "READY", {}),  # not in the policy
    ]
    svc = make_service(reg, devices=["cpu"])
    svc.open()
    from sae_mlops.service.reconciler import Reconciler

    rec = Reconciler(svc.settings, svc.policy, svc.queue, reg, svc.wake, threading.Event())
    ids = rec.scan_once()
    jobs = {svc.queue.get(i).version: svc.queue.get(i) for i in ids}
    assert sorted(jobs) == ["1", "4"] and all(j.trigger == "reconcile" for j in jobs.values())
    assert jobs["1"].options == {"max_tokens": 100}
    assert rec.scan_once() == []  # queued now: nothing new
    assert rec.status()["enqueued_total"] == 2 and rec.status()["scans"] == 2


def test_reconciler_at_start_and_webhook_registration(make_service):
    reg = FakeRegistry()
    reg.versions = [VersionInfo("sae-a", "7", "READY", {})]
    svc = make_service(reg, webhook_url="http://svc:8080/webhooks/mlflow")
    svc.start()
    job = wait_for(lambda: svc.queue.jobs_for("sae-a", "7"), what="reconciled job")[0]
    assert wait_job(svc, job.id).state == "done"
    (call,) = reg.of("webhook")
    assert call == ("webhook", "sae-mlops", "http://svc:8080/webhooks/mlflow", SECRET,
                    ("model_version.created", "model_version_tag.set"))
    wait_for(lambda: not svc.reconciler.alive, what="reconciler done (interval 0: start only)")
    assert svc.reconciler.status()["webhook"]["id"] == "wh-1"


# --- settings --------------------------------------------------------------------------------------


def test_settings_precedence_file_env_cli(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9000\nhost: 0.0.0.0\ndevices: [cuda:0, cuda:1]\nwebhook_secret: from-file\nkeep_outputs: true\n")
    env = {"SAE_MLOPS_PORT": "9100", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "SAE_MLOPS_RETRY_BACKOFF_S": "2.5"}
    s = load_settings(cfg, {"port": 9200, "host": None}, environ=env)
    assert s.port == 9200 and s.host == "0.0.0.0" and s.devices == ["cuda:0", "cuda:1"]
    assert s.tracking_uri == "http://mlflow:5000" and s.retry_backoff_s == 2.5 and s.keep_outputs is True
    assert s.secret() == "from-file" and "from-file" not in json.dumps(s.public_dict())
    s = load_settings(cfg, environ=env)
    assert s.port == 9100


def test_settings_toml_json_env_config_and_secret_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3\n")
    t = tmp_path / "serve.toml"
    t.write_text(f'port = 7000\nwebhook_secret_file = "{secret}"\n[policy]\nrules = [{{quick = {{}}}}]\n')
    s = load_settings(environ={"SAE_MLOPS_CONFIG": str(t), "SAE_MLOPS_DEVICES": "cpu,cuda:0"})
    assert s.port == 7000 and s.secret() == "s3" and s.policy == {"rules": [{"quick": {}}]} and s.devices == ["cpu", "cuda:0"]
    j = tmp_path / "serve.json"
    j.write_text('{"log-format": "json", "webhook_tolerance_s": 60}')
    s = load_settings(j, environ={})
    assert s.log_format == "json" and s.webhook_tolerance_s == 60.0


@pytest.mark.parametrize(
    "env, words",
    [
        ({"SAE_MLOPS_PORT": "eighty"}, "whole number"),
        ({"SAE_MLOPS_PORT": "70000"}, "out of range"),
        ({"SAE_MLOPS_MAX_ATTEMPTS": "0"}, "at least 1"),
        ({"SAE_MLOPS_LOG_FORMAT": "xml"}, "text or json"),
        ({"SAE_MLOPS_KEEP_OUTPUTS": "maybe"}, "true or false"),
        ({"SAE_MLOPS_QUICK_TIMEOUT_S": "-1"}, "positive"),
    ],
)
def test_bad_settings_raise_one_clear_error(env, words):
    with pytest.raises(InputError, match=words):
        load_settings(environ=env)


def test_missing_secret_and_unknown_keys(tmp_path):
    with pytest.raises(InputError, match="SAE_MLOPS_WEBHOOK_SECRET"):
        load_settings(environ={}).secret()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prot: 1\n")
    with pytest.raises(InputError, match="Unknown setting 'prot'"):
        load_settings(cfg, environ={})


def test_serve_command_reports_missing_secret_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sae_mlops.cli import app

    for k in ("SAE_MLOPS_WEBHOOK_SECRET", "SAE_MLOPS_WEBHOOK_SECRET_FILE", "SAE_MLOPS_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    r = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 2 and "SAE_MLOPS_WEBHOOK_SECRET" in r.output and "Traceback" not in r.output


# --- failure classes -------------------------------------------------------------------------------


def _denied():
    from mlflow.exceptions import RestException

    return RestException({"error_code": "PERMISSION_DENIED", "message": "User lacks permission to edit sae-a"})


def test_mlflow_unavailable_retries_without_using_attempts(make_service):
    reg = FakeRegistry()
    reg.fail_running = [ConnectionError("connection refused")] * 3
    svc = make_service(reg, max_attempts=1)
    svc.start()
    job = wait_job(svc, enqueue(svc))
    assert job.state == "done" and job.attempts == 1 and job.outage_since is None
    assert len(svc.fake.of("running")) == 1


def test_an_outage_longer_than_the_limit_fails_the_job_with_that_reason(make_service):
    from mlflow.exceptions import MlflowException

    e = MlflowException("API request to http://mlflow:5000/api/2.0/x failed with exception ConnectionError")
    e.sticky = True  # type: ignore[attr-defined]
    reg = FakeRegistry()
    reg.fail_running = [e]
    svc = make_service(reg, max_attempts=3, tracking_outage_max_s=0.5)
    svc.start()
    job = wait_job(svc, enqueue(svc))
    assert job.state == "failed" and job.attempts == 0
    assert "tracking server was unreachable" in job.error and "(limit 0.5s)" in job.error
    assert not (svc.settings.jobs_dir / str(job.id) / "runs").exists()  # never analysed


def test_permission_denied_fails_at_once_with_the_reason(make_service):
    reg = FakeRegistry()
    reg.fail_running = [_denied()]
    svc = make_service(reg, max_attempts=3)
    svc.start()
    job = wait_job(svc, enqueue(svc))
    assert job.state == "failed" and job.attempts == 1 and "permission" in job.error and "lacks permission" in job.error
    (call,) = wait_for(lambda: svc.fake.of("failed"), what="failure written back")
    assert "lacks permission" in call[5]


def test_a_bug_uses_an_attempt_and_keeps_the_traceback(make_service):
    reg = FakeRegistry()
    reg.fail_running = [TypeError("unexpected keyword 'x'")]
    svc = make_service(reg, max_attempts=2)
    svc.start()
    jid = enqueue(svc)
    job = wait_job(svc, jid)
    assert job.state == "done" and job.attempts == 2
    log1 = (svc.settings.jobs_dir / str(jid) / "attempt-1.log").read_text()
    assert "Traceback" in log1 and "TypeError: unexpected keyword 'x'" in log1


def test_job_process_exit_codes_unavailable_and_denied(make_service):
    svc = make_service(max_attempts=1)
    svc.start()
    job = wait_job(svc, enqueue(svc, behaviour="unavailable_once"))
    assert job.state == "done" and job.attempts == 1  # exit 75 gave its attempt back
    assert (svc.settings.jobs_dir / str(job.id) / "runs").read_text() == "2"
    job = wait_job(svc, enqueue(svc, version="2", behaviour="denied"))
    assert job.state == "failed" and job.attempts == 1 and "exit code 77" in job.error
    assert ("close_runs", svc.settings.experiment, svc.queue.job_key(job.id)) in svc.fake.calls


def test_a_claimed_job_shows_its_phase(make_service):
    svc = make_service()
    svc.start()
    jid = enqueue(svc, behaviour="sleep")
    job = wait_for(lambda: (j := svc.queue.get(jid)) and j.pid and j, what="job process started")
    assert job.state == "running" and job.phase == "analysing"
    worker = svc.health()[1]["workers"][0]
    assert worker["phase"] == "analysing" and worker["pid"] == job.pid


# --- health, read access and body limits -----------------------------------------------------------


def test_health_is_degraded_while_the_tracking_server_is_down(make_service):
    from mlflow_servers import free_port

    from sae_mlops.service.app import create_app

    svc = make_service(tracking_uri=f"http://127.0.0.1:{free_port()}", health_check_timeout_s=1.0)
    with TestClient(create_app(svc), client=LOOPBACK) as http:
        r = http.get("/health")
        body = r.json()
        assert r.status_code == 200 and body["status"] == "degraded"
        assert body["tracking"]["reachable"] is False and "error" in body["tracking"]
        assert body["workers"][0]["alive"]


def test_read_endpoints_answer_loopback_only_without_a_token(make_service):
    from sae_mlops.service.app import create_app

    svc = make_service()
    with TestClient(create_app(svc), client=REMOTE) as http:
        assert http.get("/jobs").status_code == 403
        assert http.get("/jobs/1").status_code == 403
        h = http.get("/health")
        assert h.status_code == 200 and h.json() == {"status": "ok", "tracking": {"reachable": True}}
        headers, body = delivery()  # the webhook itself is open (it is signed)
        assert http.post("/webhooks/mlflow", content=body, headers=headers).status_code == 202


def test_read_endpoints_need_the_token_when_one_is_set(make_service):
    from sae_mlops.service.app import create_app

    svc = make_service(read_token="t0ken")
    for client in (REMOTE, LOOPBACK):
        with TestClient(create_app(svc), client=client) as http:
            assert http.get("/jobs").status_code == 403
            assert http.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 403
            assert http.get("/jobs", headers={"Authorization": "Bearer t0ken"}).status_code == 200
            assert "workers" not in http.get("/health").json()
            assert "workers" in http.get("/health", headers={"Authorization": "Bearer t0ken"}).json()
        svc.stop()
        svc.queue = None


def test_chunked_body_over_the_limit_is_cut_off(make_service):
    from sae_mlops.service.app import create_app

    svc = make_service()
    with TestClient(create_app(svc), client=LOOPBACK) as http:
        headers, _ = delivery()

        def chunks():
            for _ in range(200):
                yield b"x" * 65536  # 13 MB in all, no Content-Length

        r = http.post("/webhooks/mlflow", content=chunks(), headers=headers)
        assert r.status_code == 413 and r.json()["reason"] == "body too large"
        headers, body = delivery()
        assert http.post("/webhooks/mlflow", content=iter([body[:10], body[10:]]), headers=headers).status_code == 202


def test_settings_refuse_unknown_keys_and_describe_every_field():
    from pydantic import ValidationError

    for name, f in Settings.model_fields.items():
        assert f.description and len(f.description) > 20, name
    with pytest.raises(ValidationError):
        Settings(prot=1)
    s = load_settings(environ={"SAE_MLOPS_READ_TOKEN": "tok-123", "SAE_MLOPS_TRACKING_OUTAGE_MAX_S": "60",
                               "SAE_MLOPS_MLFLOW_HTTP_MAX_RETRIES": "0"})
    assert s.read_token == "tok-123" and s.tracking_outage_max_s == 60.0 and s.mlflow_http_max_retries == 0
    assert s.public_dict()["read_token"] == "set" and "tok-123" not in json.dumps(s.public_dict())
