"""Workers: one thread per device, one job at a time, each job in its own process.

For a claimed job the worker writes ``jobs/<id>/spec.json``, sets the version's status tag to
``running`` and starts ``python -m sae_mlops.service.job spec.json`` in a new session (its output in
``jobs/<id>/attempt-<n>.log``, ``TMPDIR`` in ``jobs/<id>/tmp``). It waits with the kind's timeout
(then kills the process group). Outcomes:

- exit 0 with ``result.json``: write-back (status, run id, metrics, gate) then ``done``;
- exit 2 (the input cannot be analysed): ``failed`` at once, and the failure written back;
- anything else (an exception, a signal such as the kernel's OOM kill, a timeout): retried with
  backoff while attempts remain, then ``failed`` and written back.

A ``result.json`` already present when a job is claimed (the service stopped between the analysis
and the write-back) is written back without running the analysis again. A write-back that fails
because MLflow is unreachable is retried later without using up an attempt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from sae_mlops.service import job as job_module
from sae_mlops.service.mlflow_io import RegistryIO, VersionMissing
from sae_mlops.service.policy import Policy
from sae_mlops.service.queue import FAILED, Job, JobQueue
from sae_mlops.service.settings import Settings

log = logging.getLogger(__name__)

KILL_GRACE_S = 10.0
LOG_TAIL_CHARS = 2000
_DROP_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")

Command = Callable[[Path], list[str]]


def default_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "sae_mlops.service.job", str(spec_path)]


class _Interrupted(Exception):
    pass


class Worker:
    """A thread taking jobs from `queue` for one `device`."""

    def __init__(
        self,
        index: int,
        device: str,
        settings: Settings,
        policy: Policy,
        queue: JobQueue,
        registry: RegistryIO,
        cond: threading.Condition,
        stop: threading.Event,
        command: Command | None = None,
    ) -> None:
        self.name = f"worker-{index}-{device}"
        self.device = device
        self.settings = settings
        self.policy = policy
        self.queue = queue
        self.registry = registry
        self.cond = cond
        self.stop_event = stop
        self.command = command or default_command
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._state: dict[str, Any] = {"state": "idle", "job_id": None, "pid": None, "since": time.time()}
        self.jobs_done = 0
        self.jobs_failed = 0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "alive": self.alive,
            **self._state,
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
        }

    # --- loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        log.info("%s started", self.name, extra={"worker": self.name})
        while not self.stop_event.is_set():
            try:
                job = self.queue.claim(self.name)
            except Exception:  # noqa: BLE001 - a broken queue must not kill the thread silently
                log.exception("%s could not claim a job", self.name, extra={"worker": self.name})
                self.stop_event.wait(self.settings.worker_poll_s)
                continue
            if job is None:
                self._idle_wait()
                continue
            self._set_state("busy", job.id)
            try:
                self.process(job)
            except _Interrupted:
                log.info("%s: job %d interrupted by shutdown; it stays queued", self.name, job.id, extra={"job_id": job.id})
                self.queue.mark_attempt_failed(job.id, "interrupted: the service shut down", count_attempt=False)
            except Exception as e:  # noqa: BLE001
                log.exception("%s: job %d failed in the worker", self.name, job.id, extra={"job_id": job.id})
                self._finish_failed(job, f"worker error: {e!r}", retry=True)
            finally:
                self._set_state("idle", None)
        self._set_state("stopped", None)
        log.info("%s stopped", self.name, extra={"worker": self.name})

    def _idle_wait(self) -> None:
        timeout = self.settings.worker_poll_s
        due = self.queue.next_due()
        if due is not None:
            timeout = max(0.05, min(timeout, due - time.time()))
        with self.cond:
            if not self.stop_event.is_set():
                self.cond.wait(timeout)

    def _set_state(self, state: str, job_id: int | None, pid: int | None = None) -> None:
        self._state = {"state": state, "job_id": job_id, "pid": pid, "since": time.time()}

    # --- one job ------------------------------------------------------------------------

    def process(self, job: Job) -> None:
        job_dir = self.settings.jobs_dir / str(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        result_path = job_dir / "result.json"
        extra = {"job_id": job.id, "model": job.model_name, "version": job.version, "kind": job.kind, "attempt": job.attempts}
        result = read_result(result_path)
        if result is None:
            try:
                self.registry.mark_running(job.model_name, job.version, job.kind, job.id)
            except VersionMissing as e:
                log.warning("job %d: %s; not analysing", job.id, e, extra=extra)
                self.queue.mark_attempt_failed(job.id, str(e), retry=False)
                self.jobs_failed += 1
                return
            except Exception as e:  # noqa: BLE001 - MLflow unreachable: try later, attempt not used
                delay = self.queue.backoff(max(1, job.attempts))
                log.warning("job %d: MLflow unreachable (%s); retrying in %.0fs", job.id, e, delay, extra=extra)
                self.queue.mark_attempt_failed(job.id, f"MLflow unreachable: {e}", count_attempt=False, delay=delay)
                return
            log.info("job %d: %s analysis of %s v%s, attempt %d/%d on %s", job.id, job.kind, job.model_name,
                     job.version, job.attempts, job.max_attempts, self.device, extra=extra)
            rc, error = self._run_process(job, job_dir, result_path)
            if rc == 0:
                result = read_result(result_path)
                if result is None:
                    rc, error = job_module.EXIT_FAILED, "the job exited without writing result.json"
            if result is None:
                permanent = rc == job_module.EXIT_INPUT_ERROR
                log.warning("job %d attempt %d failed: %s", job.id, job.attempts, error.splitlines()[0] if error else rc, extra=extra)
                self._finish_failed(job, error, retry=not permanent)
                return
        else:
            log.info("job %d: result.json from an earlier attempt; writing it back", job.id, extra=extra)
        self._write_back(job, result, job_dir, extra)

    def _write_back(self, job: Job, result: dict[str, Any], job_dir: Path, extra: dict[str, Any]) -> None:
        run_id = result.get("run_id")
        metrics = result.get("metrics") or {}
        gate = self.policy.gate
        try:
            gate_result = self.registry.write_done(job.model_name, job.version, job.kind, job.id, run_id, metrics, gate)
        except VersionMissing as e:
            log.warning("job %d: analysis done (run %s) but %s; nothing written back", job.id, run_id, e, extra=extra)
            gate_result = None
        except Exception as e:  # noqa: BLE001 - MLflow unreachable: keep the result, retry the write-back
            delay = self.queue.backoff(max(1, job.attempts))
            log.warning("job %d: write-back failed (%s); retrying in %.0fs", job.id, e, delay, extra=extra)
            self.queue.mark_attempt_failed(job.id, f"write-back failed: {e}", count_attempt=False, delay=delay)
            return
        if gate_result is not None:
            result = {**result, "gate": {"passed": gate_result.passed, "reasons": gate_result.reasons}}
        if not self.settings.keep_outputs:  # already logged to the run: clean up before marking done
            shutil.rmtree(job_dir / "out", ignore_errors=True)
        self.queue.mark_done(job.id, run_id, result)
        self.jobs_done += 1
        log.info("job %d done: run %s", job.id, run_id, extra={**extra, "run_id": run_id})

    def _finish_failed(self, job: Job, error: str, retry: bool) -> None:
        updated = self.queue.mark_attempt_failed(job.id, error, retry=retry)
        if updated.state != FAILED:
            log.info("job %d will be retried at %s (attempt %d/%d used)", job.id,
                     time.strftime("%H:%M:%S", time.localtime(updated.not_before)), updated.attempts,
                     updated.max_attempts, extra={"job_id": job.id})
            return
        self.jobs_failed += 1
        log.error("job %d failed for good: %s", job.id, (error or "").splitlines()[0] if error else "", extra={"job_id": job.id})
        try:
            self.registry.write_failed(job.model_name, job.version, job.kind, job.id, error or "failed")
        except Exception as e:  # noqa: BLE001 - the failure stays in the queue; MLflow may be down
            log.warning("job %d: could not write the failure to the registry: %s", job.id, e, extra={"job_id": job.id})

    # --- the process --------------------------------------------------------------------

    def _run_process(self, job: Job, job_dir: Path, result_path: Path) -> tuple[int, str]:
        tmp = job_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        spec = {
            "job_id": job.id,
            "model_name": job.model_name,
            "version": job.version,
            "kind": job.kind,
            "options": job.options,
            "trigger": job.trigger,
            "device": self.device,
            "experiment": self.settings.experiment,
            "tracking_uri": self.settings.tracking_uri,
            "out_dir": str((job_dir / "out").resolve()),
            "result_path": str(result_path.resolve()),
            "log_format": self.settings.log_format,
            "log_level": self.settings.log_level,
        }
        spec_path = job_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        env[job_module.PARENT_PID_ENV] = str(os.getpid())
        env["TMPDIR"] = str(tmp.resolve())
        env["PYTHONUNBUFFERED"] = "1"
        if self.settings.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.settings.tracking_uri
        log_path = job_dir / f"attempt-{job.attempts}.log"
        timeout = self.settings.timeout_for(job.kind)
        started = time.monotonic()
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                self.command(spec_path.resolve()),
                cwd=str(job_dir),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.queue.set_pid(job.id, proc.pid)
            self._set_state("busy", job.id, proc.pid)
            try:
                rc = self._wait(proc, started + timeout)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if rc is None:
            return job_module.EXIT_FAILED, f"timed out after {timeout:.0f}s (killed)\n{_tail(log_path)}"
        if rc == 0:
            return 0, ""
        if rc < 0:
            sig = -rc
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            hint = " (out of memory?)" if sig == signal.SIGKILL else ""
            return rc, f"killed by {name}{hint}\n{_tail(log_path)}"
        return rc, f"exit code {rc}\n{_tail(log_path)}"

    def _wait(self, proc: subprocess.Popen, deadline: float) -> int | None:
        """The exit code, or None after a timeout; raises _Interrupted on shutdown (process killed)."""
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if self.stop_event.is_set():
                _kill_group(proc)
                raise _Interrupted()
            if time.monotonic() > deadline:
                _kill_group(proc)
                return None


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
