"""The reconciler: what the webhooks missed.

MLflow gives up on a delivery after a few failed attempts, so versions registered while the service
was down (or unreachable) would never be analysed. At start, and then every
``reconcile_interval_s`` seconds, the reconciler lists the versions of the registered models the
policy covers (`RegistryIO.iter_versions`) and enqueues, for each analysis the policy wants for a
version (`Policy.for_version`), one that has no job in the local queue and whose status tag is not
``done`` or ``failed`` (a ``running`` tag with no local job is a leftover of a lost queue).

Before its first scan it also creates or updates the MLflow webhook when ``webhook_url`` is set,
retrying until MLflow answers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from sae_mlops.service import tags as T
from sae_mlops.service.mlflow_io import RegistryIO
from sae_mlops.service.policy import Policy
from sae_mlops.service.queue import JobQueue
from sae_mlops.service.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_ERROR_S = 30.0


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        queue: JobQueue,
        registry: RegistryIO,
        wake: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.queue = queue
        self.registry = registry
        self.wake = wake
        self.stop_event = stop
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self.state: dict[str, Any] = {
            "scans": 0,
            "last_scan_at": None,
            "last_scan_seconds": None,
            "last_error": None,
            "enqueued_total": 0,
            "webhook": None,
        }

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {"alive": self.alive, "interval_s": self.settings.reconcile_interval_s, **self.state}

    def scan_once(self) -> list[int]:
        """One pass over the registry; returns the ids of the jobs it enqueued."""
        started = time.monotonic()
        enqueued: list[int] = []
        seen = 0
        for v in self.registry.iter_versions(self.policy):
            if self.stop_event.is_set():
                break
            seen += 1
            if v.status.upper() != "READY":
                continue
            for req in self.policy.for_version(v.name, v.version, v.tags, v.aliases):
                if self.queue.has_job(*req.key):
                    continue
                if v.tags.get(T.status_tag(req.kind)) in (T.STATUS_DONE, T.STATUS_FAILED):
                    continue
                r = self.queue.enqueue(req)
                if r.created:
                    enqueued.append(r.job_id)
        self.state.update(
            scans=self.state["scans"] + 1,
            last_scan_at=time.time(),
            last_scan_seconds=round(time.monotonic() - started, 3),
            last_error=None,
            enqueued_total=self.state["enqueued_total"] + len(enqueued),
        )
        log.info("reconciler: %d version(s) checked, %d job(s) enqueued", seen, len(enqueued),
                 extra={"versions": seen, "enqueued": enqueued})
        if enqueued:
            self.wake()
        return enqueued

    def _loop(self) -> None:
        webhook_ok = not self.settings.webhook_url
        while not self.stop_event.is_set():
            if not webhook_ok:
                webhook_ok = self._ensure_webhook()
            try:
                self.scan_once()
                ok = True
            except Exception as e:  # noqa: BLE001 - MLflow down: try again later
                ok = False
                self.state["last_error"] = f"{type(e).__name__}: {e}"[:1000]
                log.warning("reconciler: registry scan failed: %s", e)
            interval = self.settings.reconcile_interval_s
            if ok and webhook_ok and interval <= 0:
                break  # only at start
            wait = interval if ok and interval > 0 else min(interval or RETRY_AFTER_ERROR_S, RETRY_AFTER_ERROR_S)
            if self.stop_event.wait(wait):
                break

    def _ensure_webhook(self) -> bool:
        s = self.settings
        try:
            webhook_id = self.registry.ensure_webhook(s.webhook_name, s.webhook_url or "", s.secret(), self.policy.webhook_events())
        except Exception as e:  # noqa: BLE001
            self.state["webhook"] = {"url": s.webhook_url, "error": f"{type(e).__name__}: {e}"[:1000]}
            log.warning("could not create/update the MLflow webhook %s: %s", s.webhook_name, e)
            return False
        self.state["webhook"] = {"url": s.webhook_url, "id": webhook_id, "events": self.policy.webhook_events()}
        return True
