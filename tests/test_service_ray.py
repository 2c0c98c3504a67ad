"""The service's Ray executor with real Ray (no mocks), and the base-model cache its actors use.

- `test_model_cache_*`: `load_model("demo")` through a `ModelCache` returns the same object for the
  same (name, dtype, device, kwargs), evicts the least recently used, and an analysis leaves the
  cached model as it found it (two quick analyses on the cached model give the same metrics).
- The stack, all on 127.0.0.1: a Ray head started here (``ray start --head --block`` on a free port,
  4 logical CPUs (two actors of the module's service, the kill -9 test's actor and its retry's),
  token authentication with a token made here, its own temp dir; stopped with its process
  group, never ``ray stop``, which would stop every Ray instance on the machine), ``mlflow server``
  (sqlite, proxied artifacts, webhooks) and ``sae-mlops serve`` with ``executor: ray`` pointed at
  the head through Ray Client (``ray_address: ray://127.0.0.1:<port>``, as the compose service
  reaches its head), two actors. Registering two demo SAE versions makes two jobs that run
  on the two actors and are written back; a third version runs on an already warm actor (no new
  actor started); an actor SIGKILLed mid-job (its run RUNNING in MLflow) is retried like a killed
  job process: the job completes on a new actor with one FINISHED run and the killed one FAILED.
- ``kill -9`` of a second service (one actor, on the same head) mid-pass: its actor lives on as an
  orphan beside the restarted service's retry, which kills it before touching the job, resumes the
  shards it saved and finishes with the planned counts, one FINISHED run, nothing of the orphan
  written after the takeover and no temp folder left (~50-90 s on a loaded 2-core machine).
- Without ``ray_address`` the service starts its own Ray instance: a job past ``quick_timeout_s``
  has its actor killed and fails with the reason (written back), and after the service stops no
  process of its Ray instance is left.
- The Ray settings parse from the environment and bad values are refused with one sentence.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from mlflow_servers import free_port
from service_stack import BIN, ServiceProc, mlflow_webhook_server, pid_alive, stop_group

MODEL = "sae-ray-demo"
SLOW_MODEL = "sae-ray-slow"
TIMEOUT_MODEL = "sae-ray-timeout"
SECRET = "ray-test-secret"
EXPERIMENT = "service-ray"
TIMEOUT_S = 240.0
POLICY = (
    "rules:\n"
    "  - models: ['sae-ray-demo']\n"
    "    triggers: {created: true}\n"
    "    quick: {max_tokens: 2000, batch_size: 8}\n"
    "  - models: ['sae-ray-slow']\n"
    "    triggers: {created: true}\n"
    "    quick: {max_tokens: 50000, batch_size: 16}\n"
    "  - models: ['sae-ray-timeout']\n"
    "    triggers: {created: true}\n"
    "    quick: {max_tokens: 400000, batch_size: 16}\n"
)


# --- the model cache -----------------------------------------------------------------------------


@pytest.fixture()
def model_cache():
    from sae_mlops.sources.model_cache import ModelCache, set_model_cache

    cache = ModelCache(2)
    previous = set_model_cache(cache)
    try:
        yield cache
    finally:
        set_model_cache(previous)


def test_model_cache_same_object_for_the_same_key_and_lru_eviction(model_cache):
    from sae_mlops.sources.model import load_model

    a = load_model("demo")
    assert load_model("demo", device="cpu", dtype="float32") is a  # the same key
    b = load_model("demo", from_pretrained_kwargs={"center_unembed": False})  # kwargs are part of the key
    assert b is not a and b.model is not a.model
    assert load_model("demo") is a  # a is now the most recently used
    c = load_model("demo", from_pretrained_kwargs={"fold_ln": False})  # evicts b, the least recently used
    assert model_cache.stats()["evictions"] == 1 and len(model_cache.keys()) == 2
    kwargs_of = [k[3] for k in model_cache.keys()]
    assert kwargs_of == ["{}", '{"fold_ln": false}'], kwargs_of
    assert load_model("demo") is a and load_model("demo", from_pretrained_kwargs={"fold_ln": False}) is c
    assert model_cache.hits == 4 and model_cache.misses == 3
    assert model_cache.key("demo", "float32", "cpu", None) != model_cache.key("demo", "float64", "cpu", None)


def test_model_cache_an_analysis_leaves_the_cached_model_unchanged(model_cache):
    from sae_mlops.analyses.quick import run_quick
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path

    cfg = AnalysisConfig(sae=str(demo_sae_path("saelens")), device="cpu", max_tokens=1500, batch_size=8, progress=False)
    first = run_quick(cfg)
    (key,) = model_cache.keys()
    model = model_cache._items[key].model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    second = run_quick(cfg)  # on the cached model
    assert model_cache.hits == 1
    assert not any(model.hook_dict[name].fwd_hooks for name in model.hook_dict)
    for k, v in model.state_dict().items():
        assert v.equal(weights[k]), k
    numbers = {k: v for k, v in first.metrics.items()
               if k.startswith(("downstream/", "recon/", "sparsity/", "features/", "tokens/")) and isinstance(v, (int, float))}
    assert "downstream/loss_recovered" in numbers and "sparsity/l0_mean" in numbers
    for k, v in numbers.items():
        assert second.metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k


def test_ray_settings_parse_and_refuse_bad_values():
    from sae_mlops.errors import InputError
    from sae_mlops.service.settings import load_settings

    base = {"SAE_MLOPS_WEBHOOK_SECRET": "x"}
    assert load_settings(environ=base).executor == "local"  # today's behaviour by default
    s = load_settings(environ={**base, "SAE_MLOPS_EXECUTOR": "Ray", "SAE_MLOPS_RAY_ADDRESS": "ray://head:10001",
                               "SAE_MLOPS_RAY_WORKERS": "3", "SAE_MLOPS_RAY_NUM_GPUS": "0.5",
                               "SAE_MLOPS_RAY_CPUS_PER_WORKER": "2", "SAE_MLOPS_MODEL_CACHE_SIZE": "0"})
    assert (s.executor, s.ray_address, s.ray_workers, s.ray_num_gpus, s.ray_cpus_per_worker, s.model_cache_size) == \
        ("ray", "ray://head:10001", 3, 0.5, 2.0, 0)
    assert s.ray_connect_timeout_s == 150.0
    assert load_settings(environ={**base, "SAE_MLOPS_RAY_CONNECT_TIMEOUT_S": "45"}).ray_connect_timeout_s == 45.0
    for key, value, words in (("EXECUTOR", "spark", "executor"), ("RAY_WORKERS", "0", "ray_workers"),
                              ("RAY_WORKERS", "two", "whole number"), ("RAY_NUM_GPUS", "-1", "ray_num_gpus"),
                              ("RAY_CPUS_PER_WORKER", "0", "ray_cpus_per_worker"),
                              ("MODEL_CACHE_SIZE", "-1", "model_cache_size"),
                              ("RAY_CONNECT_TIMEOUT_S", "0", "ray_connect_timeout_s")):
        with pytest.raises(InputError, match=words):
            load_settings(environ={**base, f"SAE_MLOPS_{key}": value})


def test_a_ray_client_connection_that_does_not_finish_fails_within_its_deadline(tmp_path):
    """`ray_executor._init_with_deadline` against a server that accepts connections and never answers
    (the way ``ray.init`` hung when the head's Ray Client proxy could not start a client's server):
    a RuntimeError naming the address after the deadline, and the process exits (the connecting
    thread is a daemon)."""
    import socket
    import sys

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"ray://127.0.0.1:{silent.getsockname()[1]}"
        code = ("from sae_mlops.service.ray_executor import _init_with_deadline\n"
                f"_init_with_deadline({address!r}, 3)")
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                   "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 64},
                              cwd=tmp_path)
        elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"RuntimeError: connecting to the Ray cluster at {address} did not finish within 3 s" in proc.stderr, \
        proc.stderr[-3000:]
    assert elapsed < 60, elapsed  # the deadline, not Ray Client's own retries


# --- the stack -----------------------------------------------------------------------------------


def _ray_head(tmp: Path, token: str):
    """``ray start --head --block`` on loopback; returns (process, its Ray Client address ray://...)."""
    port, client_port = free_port(), free_port()
    # the head's Ray Client proxy gives each client's server 30 s to start by default; a loaded 2-core CI
    # machine has exceeded that once (the service then refuses to start), so allow 120 s
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120", "RAY_worker_niceness": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp / "ray-head.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--num-gpus=0",
             "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--ray-client-server-port={client_port}", "--disable-usage-stats",
             f"--temp-dir={tmp / 'ray'}"],
            env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if "Ray runtime started" in log.read_text(errors="replace"):
            return proc, f"ray://127.0.0.1:{client_port}"
        time.sleep(0.3)
    stop_group(proc, timeout=5)
    raise RuntimeError(f"the Ray head did not start within 90s:\n{log.read_text(errors='replace')[-4000:]}")


def _stop_ray_head(proc: subprocess.Popen) -> None:
    # `ray start --block` stops its processes on SIGTERM; whatever is left gets SIGKILL with the group.
    stop_group(proc, timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def stack():
    # Ray's socket paths must stay short: its temp dir goes directly under /tmp.
    tmp = Path(tempfile.mkdtemp(prefix="sray-", dir="/tmp"))
    token = secrets.token_hex(32)
    head = None
    service = None
    try:
        head, address = _ray_head(tmp, token)
        with mlflow_webhook_server(tmp, f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "mlartifacts")) as (uri, _):
            service = ServiceProc(
                tmp, uri, SECRET, POLICY, SAE_MLOPS_EXPERIMENT=EXPERIMENT, SAE_MLOPS_RETRY_BACKOFF_S="1",
                SAE_MLOPS_RECONCILE_INTERVAL_S="600", SAE_MLOPS_WORKER_POLL_S="0.5", SAE_MLOPS_EXECUTOR="ray",
                SAE_MLOPS_RAY_ADDRESS=address, SAE_MLOPS_RAY_WORKERS="2", SAE_MLOPS_RAY_CPUS_PER_WORKER="1",
                SAE_MLOPS_MODEL_CACHE_SIZE="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
            service.env.pop("RAY_ADDRESS", None)
            service.env["SAE_MLOPS_WEBHOOK_URL"] = f"{service.url}/webhooks/mlflow"
            try:
                service.start(timeout=180)
                yield {"uri": uri, "service": service, "tmp": tmp, "address": address, "token": token}
            finally:
                service.stop()
    finally:
        if head is not None:
            _stop_ray_head(head)
        shutil.rmtree(tmp, ignore_errors=True)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _register(client, name: str) -> str:
    """The demo SAELens SAE as an MLflow logged model, registered as a new version of `name`."""
    from service_stack import register_demo_version

    return register_demo_version(client, name)


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} not reached within {timeout:.0f}s")


def _job_for(service: ServiceProc, name: str, version: str) -> dict:
    return _wait(lambda: next((j for j in service.jobs() if j["model_name"] == name and j["version"] == version), None),
                 60, f"a job for {name} v{version}")


def _actors(service: ServiceProc) -> dict[str, dict]:
    return {w["name"]: w["ray_actor"] for w in service.get("/health").json()["workers"]}


def _check_written_back(client, name: str, version: str, job: dict) -> None:
    tags = client.get_model_version(name, version).tags
    assert tags["sae_mlops.analysis.quick.status"] == "done", tags
    run_id = tags["sae_mlops.analysis.quick.run_id"]
    assert run_id == job["run_id"] and tags["sae_mlops.analysis.quick.job_id"] == str(job["id"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sae_mlops.source_model_name"] == name and run.data.tags["sae_mlops.source_model_version"] == version
    assert float(tags["sae_mlops.analysis.quick.l0"]) == pytest.approx(run.data.metrics["sparsity/l0_mean"], rel=1e-5)


def test_ray_workers_analyse_registered_versions_end_to_end(stack):
    uri, service = stack["uri"], stack["service"]
    client = _client(uri)
    _wait(lambda: [h for h in client.list_webhooks() if h.name == "sae-mlops"], 60, "the service's webhook")
    health = service.get("/health").json()
    assert health["status"] == "ok" and [w["name"] for w in health["workers"]] == ["ray-worker-0-cpu", "ray-worker-1-cpu"]

    # Two versions at once: two jobs, one on each actor, both analysed and written back.
    v1, v2 = _register(client, MODEL), _register(client, MODEL)
    jobs = [_job_for(service, MODEL, v) for v in (v1, v2)]
    done = [service.wait_job(j["id"], lambda j: j["state"] in ("done", "failed"), TIMEOUT_S, "done") for j in jobs]
    assert [d["state"] for d in done] == ["done", "done"], [(d, service.job_log(d["id"])) for d in done]
    assert {d["worker"] for d in done} == {"ray-worker-0-cpu", "ray-worker-1-cpu"}
    for v, d in zip((v1, v2), done, strict=True):
        _check_written_back(client, MODEL, v, d)
    log = service.job_log(done[0]["id"])
    assert "quick analysis of models:/" in log  # the actor wrote the attempt's log where the job process would

    # A third version runs on a warm actor: no actor was started again, the actors' processes live on.
    actors = _actors(service)
    assert all(a["actors_started"] == 1 and pid_alive(a["pid"]) for a in actors.values()), actors
    v3 = _register(client, MODEL)
    job3 = service.wait_job(_job_for(service, MODEL, v3)["id"], lambda j: j["state"] in ("done", "failed"), TIMEOUT_S, "done")
    assert job3["state"] == "done" and job3["attempts"] == 1, (job3, service.job_log(job3["id"]))
    _check_written_back(client, MODEL, v3, job3)
    after = _actors(service)
    assert {n: (a["pid"], a["actors_started"]) for n, a in after.items()} == \
        {n: (a["pid"], 1) for n, a in actors.items()}, (actors, after)


def test_an_actor_killed_mid_job_is_retried_and_the_job_completes(stack):
    uri, service = stack["uri"], stack["service"]
    client = _client(uri)
    version = _register(client, SLOW_MODEL)
    job = _job_for(service, SLOW_MODEL, version)
    running = service.wait_job(job["id"], lambda j: j.get("pid") and j.get("phase") == "analysing", 120, "analysing")
    pid = running["pid"]
    exp = _wait(lambda: client.get_experiment_by_name(EXPERIMENT), 60, "the analysis experiment")
    flt = f"tags.`sae_mlops.service.job_id` = '{job['id']}'"
    (first,) = _wait(lambda: client.search_runs([exp.experiment_id], flt), 120, "the attempt's run")
    assert first.info.status == "RUNNING" and pid_alive(pid)
    os.kill(pid, signal.SIGKILL)  # the actor's process, mid-analysis

    done = service.wait_job(job["id"], lambda j: j["state"] in ("done", "failed"), TIMEOUT_S, "done")
    assert done["state"] == "done" and done["attempts"] == 2, (done, service.job_log(job["id"]))
    failed = [line for line in service.log.read_text(errors="replace").splitlines()
              if f"job {job['id']} attempt 1 failed" in line]
    assert failed and "Ray actor" in failed[0] and "died" in failed[0], failed
    runs = {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id], flt)}
    assert runs[first.info.run_id] == "FAILED" and sorted(runs.values()) == ["FAILED", "FINISHED"], runs
    _check_written_back(client, SLOW_MODEL, version, done)
    # The dead actor's worker started a new one (another process) to stay warm.
    replaced = _wait(lambda: [a for a in _actors(service).values() if a["actors_started"] == 2 and a["pid"]], 60,
                     "a new actor in place of the killed one")
    assert len(replaced) == 1 and replaced[0]["pid"] != pid and pid_alive(replaced[0]["pid"]), _actors(service)


# --- kill -9 of the service: the orphaned actor is fenced by the retry ----------------------------

KILL9_MODEL = "sae-ray-kill9"
KILL9_EXPERIMENT = "service-ray-kill9"
#: 4 shards of the default 131,072 tokens (the demo corpus has ~470k): long enough that the orphan
#: still runs when the restarted service's retry starts, which the test checks
KILL9_TOKENS = 400_000
KILL9_POLICY = (
    "rules:\n"
    f"  - models: ['{KILL9_MODEL}']\n"
    "    triggers: {created: true}\n"
    f"    quick: {{max_tokens: {KILL9_TOKENS}, batch_size: 16}}\n"
)


#: the kill -9 test's ray_connect_timeout_s: the head's Ray Client proxy has failed to start the
#: server of a second or third client (about 1 connection in 4 here), and the service then exits;
#: up to 6 starts make a start that never connects (1/4^6) rarer than one in 4,000
KILL9_CONNECT_TIMEOUT_S = 60


def _start_as_a_restart_policy_would(service: ServiceProc, tries: int = 6) -> None:
    """Start the service; when it exits because its Ray connection did not finish (see
    KILL9_CONNECT_TIMEOUT_S), start it again, up to `tries` times."""
    for attempt in range(1, tries + 1):
        try:
            service.start(timeout=KILL9_CONNECT_TIMEOUT_S + 120)
            return
        except RuntimeError as e:
            service.stop()
            if attempt == tries or "did not finish within" not in str(e):
                raise


def _shards_done(manifest: Path) -> int:
    return len(json.loads(manifest.read_text())["done"])


def _log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]


def _ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts).timestamp() * 1000)


def _planned_shards(max_tokens: int, batch_size: int) -> list:
    """The shard plan of the job's pass, computed here from the corpus and the tokenizer (no model run)."""
    from sae_mlops.analyses.quick import prepare
    from sae_mlops.config import AnalysisConfig, ExecutionOptions
    from sae_mlops.core.tokens import plan_pass
    from sae_mlops.demo import demo_sae_path

    cfg = AnalysisConfig(sae=str(demo_sae_path("saelens")), device="cpu", max_tokens=max_tokens, batch_size=batch_size,
                         progress=False)
    inputs = prepare(cfg)
    shards, _ = plan_pass(inputs.corpus.texts, inputs.model.tokenizer, inputs.plan, cfg.batch_size, cfg.max_tokens,
                          ExecutionOptions().shard_tokens)
    return shards


def test_kill_9_of_the_service_its_orphaned_actor_is_fenced_by_the_retry(stack):
    """The service (executor ray, one actor, on the module's head through Ray Client) is SIGKILLed
    (the process only, as a crash) once its job's pass has started (its checkpoint planned). Its actor lives on
    (an orphan: Ray Client keeps a vanished driver's actors for its reconnect grace period, 30 s by
    default, 600 s for the crashed service here so that the orphan outlives any restart) and keeps saving shards into the
    job's folder (it is paused while the service restarts, so that it still runs when the retry
    starts however long the restart takes). The service restarted on the same data dir retries the job: the retry takes the
    job's output directory over first (the orphan's actor process is killed: it is on this host),
    resumes the shards the orphan saved, and finishes. Checked: the orphan was alive and was killed
    by the retry's takeover; nothing of it (its log file, its run's metrics) changed after the
    takeover; one FINISHED run (the orphan's FAILED); the counts are those of the planned pass; no
    temp folder is left in the job's folder."""
    uri, address, token = stack["uri"], stack["address"], stack["token"]
    work = stack["tmp"] / "kill9"
    work.mkdir()
    client = _client(uri)
    version = _register(client, KILL9_MODEL)  # before the start: the reconciler's first scan enqueues it
    service = ServiceProc(
        work, uri, SECRET, KILL9_POLICY, SAE_MLOPS_EXPERIMENT=KILL9_EXPERIMENT, SAE_MLOPS_RETRY_BACKOFF_S="1",
        SAE_MLOPS_RECONCILE_INTERVAL_S="0", SAE_MLOPS_WORKER_POLL_S="0.5", SAE_MLOPS_EXECUTOR="ray",
        SAE_MLOPS_RAY_ADDRESS=address, SAE_MLOPS_RAY_WORKERS="1", SAE_MLOPS_RAY_CPUS_PER_WORKER="1",
        SAE_MLOPS_MODEL_CACHE_SIZE="1", SAE_MLOPS_RAY_CONNECT_TIMEOUT_S=str(KILL9_CONNECT_TIMEOUT_S),
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_CLIENT_RECONNECT_GRACE_PERIOD="600")
    service.env.pop("RAY_ADDRESS", None)
    orphan = None
    crashed = None
    try:
        _start_as_a_restart_policy_would(service)
        job = _job_for(service, KILL9_MODEL, version)
        job_dir = service.data_dir / "jobs" / str(job["id"])
        manifest = job_dir / "out" / "checkpoint" / "manifest.json"
        orphan = service.wait_job(job["id"], lambda j: j.get("pid") and j.get("phase") == "analysing", 180,
                                  "analysing")["pid"]
        _wait(manifest.is_file, 180, "the pass started (its checkpoint planned)")
        at_kill = _shards_done(manifest)
        crashed = service.proc
        assert crashed is not None
        os.kill(crashed.pid, signal.SIGKILL)  # the service process only: a crash (OOM kill), not a shutdown
        assert crashed.wait(timeout=30) == -signal.SIGKILL
        assert pid_alive(orphan), "the actor died with the service: no orphan to fence"
        # The orphan waits while the service restarts (up to 6 starts, see KILL9_CONNECT_TIMEOUT_S), so that
        # it runs beside the retry however long the restart takes; it goes on once the service is up.
        os.kill(orphan, signal.SIGSTOP)
        del service.env["RAY_CLIENT_RECONNECT_GRACE_PERIOD"]
        _start_as_a_restart_policy_would(service)  # the same data dir: the job is requeued (attempt 2)
        os.kill(orphan, signal.SIGCONT)
        done = service.wait_job(job["id"], lambda j: j["state"] in ("done", "failed"), TIMEOUT_S, "done")
        assert done["state"] == "done" and done["attempts"] == 2, (done, service.job_log(job["id"]))
        assert not pid_alive(orphan)

        # The retry took the directory over from the live orphan (killed: same host), not the other way round.
        retry_log = _log_lines(job_dir / "attempt-2.log")
        held = [r for r in retry_log if f"is held by PID {orphan} (an earlier attempt's orphan); killing it" in r["msg"]]
        taken = [r for r in retry_log if f"taken over from PID {orphan}" in r["msg"]]
        assert held and taken, (f"the orphan (PID {orphan}) was not taken over by the retry; it may have finished first "
                                f"(the pass is too short for this machine):\n{service.job_log(job['id'])}")
        fenced_ms = _ms(taken[0]["ts"])
        assert not [r for r in retry_log if "fencing it" in r["msg"]]  # the flock was had: the orphan was dead
        resumed = [re.search(r"resuming \S+: (\d+) of (\d+) shards done \((\d+) tokens\)", r["msg"]) for r in retry_log]
        resumed = [m for m in resumed if m]
        assert len(resumed) == 1, service.job_log(job["id"])
        n_resumed, n_shards, tokens_resumed = (int(g) for g in resumed[0].groups())
        assert at_kill <= n_resumed <= n_shards, (at_kill, n_resumed, n_shards)

        # Nothing of the orphan changed after the takeover: its log file, its run.
        orphan_log = job_dir / "attempt-1.log"
        assert orphan_log.stat().st_mtime_ns // 1_000_000 <= fenced_ms
        exp = client.get_experiment_by_name(KILL9_EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], f"tags.`sae_mlops.service.job_id` = '{job['id']}'")
        by_attempt = {r.data.tags["sae_mlops.service.attempt"]: r for r in runs}
        assert sorted(by_attempt) == ["1", "2"], {a: r.info.status for a, r in by_attempt.items()}
        first, second = by_attempt["1"], by_attempt["2"]
        assert (first.info.status, second.info.status) == ("FAILED", "FINISHED")
        assert second.info.run_id == done["run_id"]
        progress = client.get_metric_history(first.info.run_id, "progress/tokens_done")
        assert progress and max(m.timestamp for m in progress) <= fenced_ms
        assert max(m.value for m in progress) <= tokens_resumed  # the orphan saved nothing the retry did not resume
        assert first.info.end_time is not None and first.info.end_time >= fenced_ms  # closed by the retry
        _check_written_back(client, KILL9_MODEL, version, done)

        # The results are those of the whole planned pass, once.
        shards = _planned_shards(KILL9_TOKENS, 16)
        assert len(shards) == n_shards > 1
        metrics = second.data.metrics
        assert metrics["tokens/analysed"] == sum(s.tokens for s in shards)
        assert metrics["tokens/batches"] == sum(s.batches for s in shards)
        assert metrics["tokens/windows"] == sum(s.windows for s in shards)
        assert metrics["progress/tokens_done"] == metrics["tokens/analysed"]
        assert sum(s.tokens for s in shards[:n_resumed]) == tokens_resumed
        assert not list(job_dir.glob("tmp*")), sorted(p.name for p in job_dir.iterdir())
    finally:
        service.stop()
        if crashed is not None:  # anything left in the crashed service's process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(crashed.pid, signal.SIGKILL)
        if orphan is not None and pid_alive(orphan):
            os.kill(orphan, signal.SIGKILL)  # also when stopped


def test_a_job_over_its_timeout_has_its_actor_killed_on_a_ray_instance_the_service_owns(monkeypatch):
    """No ray_address: `sae-mlops serve` starts its own Ray instance (its temp dir given by
    RAY_TMPDIR), the reconciler enqueues a version of a sqlite tracking store, the job runs past
    quick_timeout_s and its actor is killed; max_attempts 1, so the job fails with the reason,
    written back; on shutdown the service stops its Ray instance (no process of it is left)."""
    tmp = Path(tempfile.mkdtemp(prefix="sro-", dir="/tmp"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    service = None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow resolves the logged model with its default client
    try:
        client = _client(uri)
        version = _register(client, TIMEOUT_MODEL)
        service = ServiceProc(
            tmp, uri, SECRET, POLICY, SAE_MLOPS_EXPERIMENT=EXPERIMENT, SAE_MLOPS_WORKER_POLL_S="0.5",
            SAE_MLOPS_RECONCILE_INTERVAL_S="0", SAE_MLOPS_EXECUTOR="ray", SAE_MLOPS_RAY_WORKERS="1",
            SAE_MLOPS_QUICK_TIMEOUT_S="6", SAE_MLOPS_MAX_ATTEMPTS="1", RAY_TMPDIR=str(tmp / "ray"))
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            service.env.pop(k, None)
        service.start(timeout=180)
        job = _job_for(service, TIMEOUT_MODEL, version)
        running = service.wait_job(job["id"], lambda j: j.get("pid") and j.get("phase") == "analysing", 120, "analysing")
        pid = running["pid"]
        assert _processes_with(str(tmp / "ray"))  # its raylet...
        failed = service.wait_job(job["id"], lambda j: j["state"] in ("done", "failed"), 120, "failed")
        assert failed["state"] == "failed" and failed["attempts"] == 1, failed
        assert failed["error"].startswith("timed out after 6s (Ray actor killed)"), failed["error"]
        _wait(lambda: not pid_alive(pid), 30, "the timed-out actor's process gone")
        # The queue says failed first, then the failure is written to the version.
        tags = _wait(lambda: (t := client.get_model_version(TIMEOUT_MODEL, version).tags)
                     .get("sae_mlops.analysis.quick.status") == "failed" and t, 60, "the failure written back")
        assert "timed out" in tags["sae_mlops.analysis.quick.error"]
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], f"tags.`sae_mlops.service.job_id` = '{job['id']}'")
        assert [r.info.status for r in runs] in ([], ["FAILED"]), [r.info.status for r in runs]
        (worker,) = service.get("/health").json()["workers"]
        assert worker["name"] == "ray-worker-0-cpu" and worker["alive"]
    finally:
        if service is not None:
            service.stop()
        deadline = time.monotonic() + 15  # Ray's processes exit within seconds of ray.shutdown()
        while (leftovers := _processes_with(str(tmp / "ray"))) and time.monotonic() < deadline:
            time.sleep(0.5)
        service_log = (tmp / "service.log").read_text(errors="replace")
        stopped = "sae-mlops service stopped" in service_log
        shutil.rmtree(tmp, ignore_errors=True)
    assert stopped, (f"the service did not stop cleanly on SIGTERM (exit code {service.proc.returncode}):\n"
                     f"{service_log[-6000:]}")
    assert not leftovers, f"processes of the service's Ray instance left after shutdown: {leftovers}"


def _processes_with(text: str) -> dict[int, str]:
    out = {}
    for p in os.listdir("/proc"):
        if p.isdigit() and _cmdline_has(p, text) and pid_alive(int(p)):
            with open(f"/proc/{p}/cmdline", "rb") as f:
                out[int(p)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    return out


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False
