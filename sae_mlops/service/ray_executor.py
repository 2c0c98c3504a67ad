"""The service's Ray executor (``executor: ray``): jobs run in-process on long-lived Ray actors.

`RayRuntime` connects the service to a Ray cluster (``ray_address``), or starts a local Ray
instance owned by the service (stopped on shutdown). Each worker thread of the service owns one
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
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sae_mlops.service.settings import Settings

log = logging.getLogger(__name__)

#: environment variables the actors get from the service (tracking server, credentials, hub cache)
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "AWS_", "HF_", "HUGGING_FACE_", "GOOGLE_", "AZURE_")
_DROP_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
LOG_RETURN_CHARS = 200_000


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
        tmp = Path(spec["out_dir"]).parent / "tmp"
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
    return handler


class RayRuntime:
    """The service's connection to Ray, and the actor options its slots use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owned = False
        self.connected = False
        self._lock = threading.Lock()

    def connect(self) -> None:
        import ray

        s = self.settings
        with self._lock:
            if self.connected:
                return
            if ray.is_initialized():
                self.connected = True
                return
            if s.ray_address:
                log.info("connecting to the Ray cluster at %s", s.ray_address)
                ray.init(address=s.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                log.info("starting a local Ray instance for the service's workers")
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
                self.owned = True
            self.connected = True
            resources = ray.cluster_resources()
        log.info("Ray: %s CPU, %s GPU in the cluster; %d actor(s) of %g CPU, %g GPU", resources.get("CPU", 0),
                 resources.get("GPU", 0), s.ray_workers, s.ray_cpus_per_worker, s.ray_num_gpus)

    def shutdown(self) -> None:
        import ray

        with self._lock:
            if self.connected:
                ray.shutdown()  # stops the local instance when the service started it
            self.connected = False

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
