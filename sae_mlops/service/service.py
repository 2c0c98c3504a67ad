"""The service object: opens the data directory, handles deliveries, runs workers and the reconciler.

With ``executor: ray`` the workers are ``ray_workers`` threads, each running its jobs on its own
long-lived Ray actor (`sae_mlops.service.ray_executor`); `stop` kills the actors and disconnects
(stopping the local Ray instance when the service started one).

`open` (before the HTTP server starts) takes an exclusive lock on ``<data_dir>/service.lock`` (one
service per data directory), opens the queue and puts jobs a dead service left ``running`` back to
``queued``. `start` starts one worker per device and the reconciler; `stop` stops them (a job
being analysed is killed and stays queued, its attempt given back).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from sae_mlops.errors import InputError
from sae_mlops.service.mlflow_io import RegistryIO, TrackingProbe
from sae_mlops.service.policy import Policy
from sae_mlops.service.queue import JobQueue
from sae_mlops.service.reconciler import Reconciler
from sae_mlops.service.settings import Settings
from sae_mlops.service.signature import SignatureError, verify
from sae_mlops.service.worker import Command, Worker

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
MIN_REPLAY_HORIZON_S = 24 * 3600.0
PRUNE_EVERY_S = 300.0


class Service:
    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        registry_factory: Callable[[str | None], RegistryIO] = RegistryIO,
        job_command: Command | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.registry_factory = registry_factory
        self.job_command = job_command
        self.secret = settings.secret()
        self.queue: JobQueue | None = None
        self.workers: list[Worker] = []
        self.reconciler: Reconciler | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._lock_fd: int | None = None
        self._last_prune = 0.0
        self.started_at: float | None = None
        self.requeued_at_start: list[int] = []
        self.probe = TrackingProbe(settings.tracking_uri, timeout_s=settings.health_check_timeout_s)
        self.ray: Any = None  # executor ray: the RayRuntime (ray_executor.py)

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        if self.queue is not None:
            return
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        s.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(s.data_dir / "service.lock")
        self.queue = JobQueue(s.queue_path, s.max_attempts, s.retry_backoff_s, s.retry_backoff_max_s)
        requeued = self.queue.requeue_running()
        self.requeued_at_start = [j.id for j in requeued]
        for j in requeued:
            log.warning("job %d was running when the service stopped; now %s", j.id, j.state, extra={"job_id": j.id})
        self._prune(force=True)

    def start(self) -> None:
        self.open()
        assert self.queue is not None
        s = self.settings
        self._stop.clear()
        if s.executor == "ray":
            from sae_mlops.service.ray_executor import ActorSlot, RayRuntime

            self.ray = RayRuntime(s)
            self.ray.connect()  # fails start-up with Ray's reason when the cluster cannot be reached
            device = "cuda" if s.ray_num_gpus > 0 else "cpu"
            self.workers = [
                Worker(i, device, s, self.policy, self.queue, self.registry_factory(s.tracking_uri), self._cond,
                       self._stop, self.job_command, slot=ActorSlot(self.ray, f"ray-worker-{i}"))
                for i in range(s.ray_workers)
            ]
        else:
            self.workers = [
                Worker(i, dev, s, self.policy, self.queue, self.registry_factory(s.tracking_uri), self._cond, self._stop, self.job_command)
                for i, dev in enumerate(s.devices)
            ]
        self.reconciler = Reconciler(s, self.policy, self.queue, self.registry_factory(s.tracking_uri), self.wake, self._stop)
        for w in self.workers:
            w.start()
        self.reconciler.start()
        self.started_at = time.time()
        log.info("sae-mlops service started: %d worker(s) on %s, queue %s, policy %s",
                 len(self.workers), ",".join(s.devices) if s.executor == "local" else
                 f"Ray ({s.ray_address or 'local instance'})", s.queue_path, self.policy.source,
                 extra={"settings": s.public_dict()})

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.wake()
        for w in self.workers:
            w.join(timeout)
        if self.reconciler is not None:
            self.reconciler.join(timeout)
        if self.ray is not None:
            for w in self.workers:
                if w.slot is not None:
                    w.slot.kill()
            self.ray.shutdown()
            self.ray = None
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("sae-mlops service stopped")

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- webhook ------------------------------------------------------------------------

    def handle_webhook(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Verify, dedupe and act on one delivery; returns (HTTP status, JSON body)."""
        assert self.queue is not None, "service not open"
        if len(body) > MAX_BODY_BYTES:
            return 413, {"status": "rejected", "reason": "body too large"}
        try:
            d = verify(headers, body, self.secret, self.settings.webhook_tolerance_s)
        except SignatureError as e:
            log.warning("webhook refused: %s", e, extra={"reason": e.reason, "delivery_id": _header(headers, "X-MLflow-Delivery-Id")})
            return (400 if e.reason == "missing_headers" else 401), {"status": "rejected", "reason": e.reason}
        try:
            payload = json.loads(body)
            event = f"{payload['entity']}.{payload['action']}"
            data = payload.get("data") or {}
            if not isinstance(data, dict):
                raise TypeError("data is not an object")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("webhook %s: malformed payload (%s)", d.delivery_id, e, extra={"delivery_id": d.delivery_id})
            return 400, {"status": "rejected", "reason": "malformed payload"}
        decision = self.policy.decide(event, data)
        outcome = f"ignored: {decision.ignored}" if decision.ignored else "accepted"
        result = self.queue.accept_delivery(d.delivery_id, event, decision.requests, outcome)
        extra = {"delivery_id": d.delivery_id, "event": event, "model": data.get("name"), "version": data.get("version")}
        self._prune()
        if result.duplicate:
            log.info("webhook %s (%s): duplicate delivery, ignored", d.delivery_id, event, extra=extra)
            return 200, {"status": "duplicate", "delivery_id": d.delivery_id}
        if decision.ignored:
            # Our own tag writes come back as events: DEBUG keeps the log readable.
            log.debug("webhook %s (%s): %s", d.delivery_id, event, decision.ignored, extra=extra)
            return 200, {"status": "ignored", "reason": decision.ignored, "delivery_id": d.delivery_id}
        jobs = [{"id": r.job_id, "created": r.created, "reason": r.reason} for r in result.results]
        log.info("webhook %s (%s) for %s v%s: jobs %s", d.delivery_id, event, data.get("name"), data.get("version"),
                 jobs, extra={**extra, "jobs": jobs})
        if result.created:
            self.wake()
        return 202, {"status": "accepted", "delivery_id": d.delivery_id, "jobs": jobs}

    def _prune(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        horizon = max(2 * self.settings.webhook_tolerance_s, MIN_REPLAY_HORIZON_S)
        assert self.queue is not None
        n = self.queue.prune_deliveries(now - horizon)
        if n:
            log.debug("forgot %d delivery id(s) older than %.0fs", n, horizon)

    # --- health -------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.queue is None:
            return 503, {"status": "stopped"}
        counts = self.queue.counts()
        workers = [w.status() for w in self.workers]
        reconciler = self.reconciler.status() if self.reconciler else None
        healthy = bool(workers) and all(w["alive"] for w in workers)
        tracking = self.probe.check()
        body = {
            "status": "ok" if healthy and tracking["reachable"] else "degraded",
            "tracking": tracking,
            "queue": {"depth": counts["queued"] + counts["running"], **counts},
            "workers": workers,
            "reconciler": reconciler,
            "started_at": self.started_at,
            "requeued_at_start": self.requeued_at_start,
            "policy": self.policy.source,
            "pid": os.getpid(),
        }
        return (200 if healthy else 503), body


def _header(headers: Mapping[str, str], name: str) -> str | None:
    try:
        return headers.get(name) or headers.get(name.lower())
    except AttributeError:
        return None


def _lock(path: Path) -> int:
    """An exclusive, non-blocking lock held for the life of the process (released by the kernel on exit)."""
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX
        return fd
    except OSError:
        os.close(fd)
        raise InputError(
            f"Another sae-mlops service is using {path.parent}; stop it or give this one another --data-dir."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd
