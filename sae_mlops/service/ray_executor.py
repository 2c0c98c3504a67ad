"""The service's Ray executor (``executor: ray``): jobs run in-process on long-lived Ray actors.

`RayRuntime` connects the service to a Ray cluster (``ray_address``), or starts a local Ray
instance owned by the service (``ray start --head`` on loopback in its own session, stopped by a
small watchdog process once the service has exited, cleanly or not). Each worker thread of the service owns one
`ActorSlot`: one `JobActor` requesting ``ray_cpus_per_worker`` CPUs and ``ray_num_gpus`` GPUs, so
Ray places it on a node with those resources and ``ray_workers`` jobs run at once across the
cluster. The actor imports the analysis stack (torch, TransformerLens, MLflow, the library) once
and keeps up to ``model_cache_size`` base models loaded (`sae_mlops.sources.model_cache`), so a
warm job pays neither the ~10 s of imports nor the model load of a fresh job process.

An actor runs the job process's own function (`sae_mlops.service.job.execute`: same analysis
call, same exactly-once run handling, same exit codes) and returns its code, result and log. The
worker keeps its guarantees around it: the job's timeout kills the actor (`ray.kill`, then a new
actor replaces it), so does a service shutdown (the job stays queued); an actor that dies
mid-job (killed, out of memory, its node lost: ``RayActorError``/``ActorDiedError``) counts like
a killed job process, retried with backoff while attempts remain.

Files: when the service's job directory is visible on the actor's node (a local instance, or a
shared filesystem), the actor writes the attempt log and the outputs there, as the job process
does; otherwise into a temporary directory on its node (the outputs are in the MLflow run either
way), and the log comes back with the result.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sae_mlops.service.settings import Settings

log = logging.getLogger(__name__)

#: tries of ``ray.init`` on a cluster address: a Ray Client proxy under load has failed to start a
#: client's server once and then worked (ConnectionAbortedError: "Starting Ray client server failed")
CONNECT_ATTEMPTS = 3

#: environment variables the actors get from the service (tracking server, credentials, hub cache)
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "AWS_", "HF_", "HUGGING_FACE_", "GOOGLE_", "AZURE_")
_DROP_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
LOG_RETURN_CHARS = 200_000
HEAD_START_TIMEOUT_S = 120.0
HEAD_STOP_GRACE_S = 8.0  # then SIGKILL to its process group (GCS, raylet; its workers exit with the raylet)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_WATCHDOG = """
import os, shutil, signal, sys, time
service, head, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
while alive(service) and alive(head):
    time.sleep(0.5)
if alive(head):
    os.kill(head, signal.SIGTERM)
    deadline = time.time() + %r
    while alive(head) and time.time() < deadline:
        time.sleep(0.2)
try:
    os.killpg(head, signal.SIGKILL)
except OSError:
    pass
shutil.rmtree(tmp, ignore_errors=True)
""" % HEAD_STOP_GRACE_S


def _init_with_deadline(address: str, timeout_s: float) -> None:
    """``ray.init(address)`` of a Ray Client address in a daemon thread, waited for at most
    `timeout_s` s (``ray_connect_timeout_s``): its exception is raised here; a `RuntimeError` naming
    the address when it has not returned by then (the thread is left behind: the caller, the
    service's start, fails and the process exits). Why: right after a ``kill -9`` of the service,
    the head's Ray Client proxy has failed to start the new client's server (its process exited at
    once; Ray 2.60, about 1 connection in 4 while another client was connected) and ``ray.init``
    then had not returned after 4 minutes."""
    import ray

    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=connect, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise RuntimeError(f"connecting to the Ray cluster at {address} did not finish within {timeout_s:.0f} s "
                           "(the head's Ray Client server may have failed to start this client's server; see "
                           "ray_client_server*.err in the head's logs); restart the service")
    if outcome["error"] is not None:
        raise outcome["error"]


def _token_auth_env() -> None:
    """Token authentication for the local head and this process (the driver): RAY_AUTH_MODE=token
    and a new RAY_AUTH_TOKEN unless one is set; Ray's cached configuration is refreshed if Ray
    was imported already."""
    import secrets

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    if "ray" in sys.modules:
        try:
            from ray._private.authentication.authentication_token_setup import _enable_token_auth

            _enable_token_auth()
        except (ImportError, AttributeError):  # pragma: no cover - another Ray version
            pass


class JobActor:
    """A long-lived Ray actor running analysis jobs one at a time (see the module docstring)."""

    def __init__(self, log_format: str, log_level: str, model_cache_size: int, num_threads: int) -> None:
        started = time.perf_counter()
        from sae_mlops.service.logs import setup_service_logging
        from sae_mlops.sources.model_cache import ModelCache, set_model_cache

        setup_service_logging(log_format, log_level)
        self.log_format, self.log_level = log_format, log_level
        self.cache = ModelCache(model_cache_size)
        set_model_cache(self.cache)
        import torch

        torch.set_num_threads(max(1, int(num_threads)))
        # Warm: what a job process imports before its first batch.
        import transformer_lens  # noqa: F401

        import sae_mlops.workflows  # noqa: F401
        from sae_mlops.service import job  # noqa: F401
        from sae_mlops.service import mlflow_io  # noqa: F401

        self.jobs = 0
        self.warm_seconds = time.perf_counter() - started

    def info(self) -> dict[str, Any]:
        """pid, host, Ray node id, GPU ids, the seconds the imports took and the model cache's counters."""
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ctx.get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "warm_seconds": round(self.warm_seconds, 3),
                "jobs": self.jobs, "model_cache": self.cache.stats()}

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one job (`job.execute`); returns {rc, result, log (when not written to spec's log_path), seconds}."""
        from sae_mlops.service import job as job_module

        started = time.perf_counter()
        self.jobs += 1
        local_dir = None
        log_path = Path(spec["log_path"])
        if not log_path.parent.is_dir():  # the service's disk is not visible here: a node-local directory
            local_dir = Path(tempfile.mkdtemp(prefix=f"sae-mlops-job-{spec.get('job_id')}-"))
            log_path = local_dir / log_path.name
            spec = {**spec, "out_dir": str(local_dir / "out")}
        handler = _job_log_handler(log_path, self.log_format)
        root = logging.getLogger()
        root.addHandler(handler)
        previous_tmp = tempfile.tempdir
        # this attempt's own temp dir: an orphan of an earlier attempt must not delete a retry's files
        tmp = Path(spec["out_dir"]).parent / f"tmp-{spec.get('attempt', 0)}-{os.getpid()}-{int(time.time())}"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            tempfile.tempdir = str(tmp)
            rc, result = job_module.execute(spec)
        finally:
            tempfile.tempdir = previous_tmp
            shutil.rmtree(tmp, ignore_errors=True)
            root.removeHandler(handler)
            handler.close()
        text = None
        if local_dir is not None:
            text = log_path.read_text(encoding="utf-8", errors="replace")[-LOG_RETURN_CHARS:]
            if not spec.get("keep_outputs"):
                shutil.rmtree(local_dir, ignore_errors=True)
        return {"rc": rc, "result": result, "log": text, "seconds": time.perf_counter() - started,
                "pid": os.getpid()}


def _job_log_handler(path: Path, log_format: str) -> logging.Handler:
    from sae_mlops.service.logs import _PLAIN, JsonFormatter

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_PLAIN))
    from sae_mlops.redact import RedactingFilter

    handler.addFilter(RedactingFilter())
    return handler


class RayRuntime:
    """The service's connection to Ray, and the actor options its slots use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owned = False
        self.connected = False
        self._lock = threading.Lock()
        self._head: Any = None  # the local head's `ray start` process, when the service started one
        self._head_dir: Path | None = None

    def connect(self) -> None:
        s = self.settings
        if not s.ray_address and "RAY_AUTH_MODE" not in os.environ:
            _token_auth_env()  # before Ray reads its configuration
        import ray

        with self._lock:
            if self.connected:
                return
            if ray.is_initialized():
                self.connected = True
                return
            if s.ray_address:
                log.info("connecting to the Ray cluster at %s", s.ray_address)
                for attempt in range(1, CONNECT_ATTEMPTS + 1):
                    try:
                        if s.ray_address.startswith("ray://"):
                            _init_with_deadline(s.ray_address, s.ray_connect_timeout_s)
                        else:
                            ray.init(address=s.ray_address, log_to_driver=False, logging_level=logging.WARNING)
                        break
                    except ConnectionError as e:  # Ray Client: the head's proxy failed to start our server
                        if attempt == CONNECT_ATTEMPTS:
                            raise
                        log.warning("connecting to %s failed (%s: %s); retrying (%d of %d)", s.ray_address,
                                    type(e).__name__, str(e).splitlines()[0][:200], attempt + 1, CONNECT_ATTEMPTS)
                        ray.shutdown()
                        time.sleep(2.0 * attempt)
            else:
                from sae_mlops.analyses.ray_shards import bind_ray_to_loopback

                bind_ray_to_loopback()  # this process is a driver of its own loopback instance only
                address = self._start_local_head()
                log.info("started a local Ray instance for the service's workers (%s, %s)", address, self._head_dir)
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                         _node_ip_address="127.0.0.1")
                self.owned = True
            self.connected = True
            resources = ray.cluster_resources()
        log.info("Ray: %s CPU, %s GPU in the cluster; %d actor(s) of %g CPU, %g GPU", resources.get("CPU", 0),
                 resources.get("GPU", 0), s.ray_workers, s.ray_cpus_per_worker, s.ray_num_gpus)

    def shutdown(self) -> None:
        import ray

        with self._lock:
            if self.connected:
                ray.shutdown()
            self.connected = False
            self._stop_local_head()

    def _start_local_head(self) -> str:
        """``ray start --head --block`` on loopback in its own session (so that a signal to the
        service's process group does not kill Ray under the running service), with a watchdog that
        stops it (SIGTERM, then SIGKILL to its group) once this process has exited; returns its address.

        Token authentication with a token made here unless RAY_AUTH_MODE is set; its temp dir
        (sockets, logs) is a new directory under $RAY_TMPDIR (default: the system's temp dir)."""
        import subprocess

        root = os.environ.get("RAY_TMPDIR") or None
        if root:
            Path(root).mkdir(parents=True, exist_ok=True)
        self._head_dir = Path(tempfile.mkdtemp(prefix="smr-", dir=root))
        port = _free_port()
        log_path = self._head_dir / "ray-head.log"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
               "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={_free_port()}",  # not Ray's fixed 10001: instances side by side
               f"--temp-dir={self._head_dir}"]
        from sae_mlops.analyses.ray_shards import LOCAL_RAY_ENV

        with open(log_path, "ab") as f:  # LOCAL_RAY_ENV: loopback only, workers not niced
            self._head = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env={**os.environ, **LOCAL_RAY_ENV})
        # Stopping the head from inside a process that was its Ray driver can abort that process
        # (seen with Ray 2.60), so a detached watchdog stops it after the service has exited
        # (also when the service is killed).
        subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self._head.pid), str(self._head_dir)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._head.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the local Ray head exited with code {self._head.returncode}:\n{tail}")
            if "Ray runtime started" in log_path.read_text(errors="replace"):
                return f"127.0.0.1:{port}"
            time.sleep(0.3)
        self._stop_local_head()
        raise RuntimeError(f"the local Ray head did not start within {HEAD_START_TIMEOUT_S:.0f}s (log: {log_path})")

    def _stop_local_head(self) -> None:
        """Forget the local head: its watchdog stops it once this process has exited."""
        if self._head is not None:
            log.info("the local Ray instance stops when the service process exits (its watchdog)")
        self._head = None
        self._head_dir = None

    def actor_env(self) -> dict[str, str]:
        """The environment the actors get: the service's MLflow/S3/hub variables and HTTP defaults."""
        from sae_mlops.service.mlflow_io import apply_http_defaults

        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k not in _DROP_ENV}
        if self.settings.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.settings.tracking_uri
        apply_http_defaults(self.settings.mlflow_http_timeout_s, self.settings.mlflow_http_max_retries, env)
        return env

    def new_actor(self, name: str) -> Any:
        import ray

        s = self.settings
        cls = ray.remote(JobActor)
        return cls.options(
            num_cpus=s.ray_cpus_per_worker,
            num_gpus=s.ray_num_gpus,
            max_restarts=0,
            max_task_retries=0,
            runtime_env={"env_vars": self.actor_env()},
            name=None,
        ).remote(s.log_format, s.log_level, s.model_cache_size, max(1, int(s.ray_cpus_per_worker)))


class ActorSlot:
    """One worker thread's actor: created on demand, replaced after it is killed or dies."""

    def __init__(self, runtime: RayRuntime, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.actor: Any = None
        self.info: dict[str, Any] = {}
        self.created = 0

    def ensure(self, timeout: float | None = None) -> dict[str, Any]:
        """Start the actor if there is none and wait for it to be ready (imports done); its info.

        Raises RayActorError when the actor has died (call `discard`, then `ensure` again)."""
        import ray

        self.runtime.connect()
        if self.actor is None:
            self.actor = self.runtime.new_actor(self.name)
            self.created += 1
            self.info = {}
        first = not self.info
        self.info = ray.get(self.actor.info.remote(), timeout=timeout)  # also checks a warm actor is alive
        if first:
            log.info("%s: Ray actor ready (pid %s on %s, imports %.1fs)", self.name, self.info.get("pid"),
                     self.info.get("host"), self.info.get("warm_seconds", 0.0))
        return self.info

    def kill(self) -> None:
        import ray

        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception as e:  # noqa: BLE001 - already dead, or the cluster is gone
                log.debug("%s: ray.kill: %s", self.name, e)
        self.discard()

    def discard(self) -> None:
        self.actor = None
        self.info = {}

    def status(self) -> dict[str, Any]:
        return {"pid": self.info.get("pid"), "host": self.info.get("host"), "node_id": self.info.get("node_id"),
                "gpu_ids": self.info.get("gpu_ids"), "actors_started": self.created}


def append_log(path: Path, text: str | None) -> None:
    if not text:
        return
    with io.open(path, "a", encoding="utf-8") as f:
        f.write(text)
