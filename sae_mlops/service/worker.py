"""Workers: one thread per device, one job at a time, each job in its own process.

For a claimed job the worker writes ``jobs/<id>/spec.json``, sets the version's status tag to
``running`` and starts ``python -m sae_mlops.service.job spec.json`` in a new session (its output in
``jobs/<id>/attempt-<n>.log``, ``TMPDIR`` in ``jobs/<id>/tmp``). It waits with the kind's timeout
(then kills the process group). Outcomes:

- exit 0 with ``result.json``: write-back (status, run id, metrics, gate) then ``done``;
- exit 2 (the input cannot be analysed) or 77 (MLflow refused: 401/403/404): ``failed`` at once,
  and the failure written back;
- exit 75 (the tracking server is unreachable or answers 5xx): back to ``queued`` without using an
  attempt, until the outage has lasted ``tracking_outage_max_s`` (then ``failed`` with that reason);
- anything else (an exception, a signal such as the kernel's OOM kill, a timeout): retried with
  backoff while attempts remain, then ``failed`` and written back.

The worker's own MLflow calls (marking the version running, the write-back) follow the same three
classes (`mlflow_io.classify`): unavailable -> retried without an attempt (capped as above);
permission or not found -> failed at once with the reason; anything else is a bug: it uses an
attempt and its traceback goes into the attempt's log. After an attempt that did not finish, runs
the job process left RUNNING in MLflow are closed as FAILED.

With ``executor: ray`` (`sae_mlops.service.ray_executor`) the worker owns a long-lived Ray actor
and runs the job in it instead (`_run_actor`: the same spec and the same exit codes, from
`job.execute`): the timeout and a shutdown kill the actor (a new one is started at once), and an
actor that dies mid-job counts like a process killed by a signal (retried with an attempt).

A ``result.json`` already present when a job is claimed (the service stopped between the analysis
and the write-back) is written back without running the analysis again.
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
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sae_mlops.service import job as job_module
from sae_mlops.service.mlflow_io import DENIED, UNAVAILABLE, RegistryIO, VersionMissing, apply_http_defaults, classify, describe
from sae_mlops.service.policy import Policy
from sae_mlops.service.queue import FAILED, Job, JobQueue
from sae_mlops.service.settings import Settings

if TYPE_CHECKING:
    from sae_mlops.service.ray_executor import ActorSlot

log = logging.getLogger(__name__)

KILL_GRACE_S = 10.0
WARM_TIMEOUT_S = 600.0  # executor ray: the longest wait for a new actor before a job needs it
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
        slot: "ActorSlot | None" = None,
    ) -> None:
        self.name = f"worker-{index}-{device}" if slot is None else f"ray-worker-{index}-{device}"
        self.slot = slot  # executor ray: the worker's Ray actor (jobs run in it instead of a process)
        self.device = device
        self.settings = settings
        self.policy = policy
        self.queue = queue
        self.registry = registry
        self.cond = cond
        self.stop_event = stop
        self.command = command or default_command
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._state: dict[str, Any] = {"state": "idle", "job_id": None, "pid": None, "phase": None, "since": time.time()}
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
        out = {
            "name": self.name,
            "device": self.device,
            "alive": self.alive,
            **self._state,
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
        }
        if self.slot is not None:
            out["ray_actor"] = self.slot.status()
        return out

    # --- loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        log.info("%s started", self.name, extra={"worker": self.name})
        if self.slot is not None:
            self._warm_actor()
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
            self._set_state("busy", job.id, phase="starting")
            try:
                self.process(job)
            except _Interrupted:
                log.info("%s: job %d interrupted by shutdown; it stays queued", self.name, job.id, extra={"job_id": job.id})
                self.queue.mark_attempt_failed(job.id, "interrupted: the service shut down", count_attempt=False)
                self._close_runs(job)
            except Exception as e:  # noqa: BLE001
                log.exception("%s: job %d failed in the worker", self.name, job.id, extra={"job_id": job.id})
                self._finish_failed(job, f"worker error: {e!r}", retry=True)
            finally:
                self._set_state("idle", None)
            if self.slot is not None and self.slot.actor is None and not self.stop_event.is_set():
                self._warm_actor()  # the job's actor died or was killed: start its replacement now
        self._set_state("stopped", None)
        log.info("%s stopped", self.name, extra={"worker": self.name})

    def _warm_actor(self) -> None:
        """Start the worker's Ray actor before the first job (its imports then cost nothing to a job)."""
        assert self.slot is not None
        try:
            if self._ensure_actor(time.monotonic() + WARM_TIMEOUT_S) is None:
                raise TimeoutError(f"not ready within {WARM_TIMEOUT_S:.0f}s")
        except _Interrupted:
            return
        except Exception as e:  # noqa: BLE001 - the first job tries again (and fails with the reason)
            log.warning("%s: the Ray actor could not be started yet: %s", self.name, e, extra={"worker": self.name})
            self.slot.kill()

    def _idle_wait(self) -> None:
        timeout = self.settings.worker_poll_s
        due = self.queue.next_due()
        if due is not None:
            timeout = max(0.05, min(timeout, due - time.time()))
        with self.cond:
            if not self.stop_event.is_set():
                self.cond.wait(timeout)

    def _set_state(self, state: str, job_id: int | None, pid: int | None = None, phase: str | None = None) -> None:
        self._state = {"state": state, "job_id": job_id, "pid": pid, "phase": phase, "since": time.time()}

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
            except Exception as e:  # noqa: BLE001 - sorted into the three failure classes
                self._mlflow_failed(job, "marking the version running", e, job_dir, extra)
                return
            self.queue.tracking_ok(job.id)
            log.info("job %d: %s analysis of %s v%s, attempt %d/%d on %s", job.id, job.kind, job.model_name,
                     job.version, job.attempts, job.max_attempts, self.device, extra=extra)
            rc, error = (self._run_process if self.slot is None else self._run_actor)(job, job_dir, result_path)
            if rc == 0:
                result = read_result(result_path)
                if result is None:
                    rc, error = job_module.EXIT_FAILED, "the job exited without writing result.json"
            if result is None:
                self._close_runs(job)
                log.warning("job %d attempt %d failed: %s", job.id, job.attempts, error.splitlines()[0] if error else rc, extra=extra)
                if rc == job_module.EXIT_TRACKING_UNAVAILABLE:
                    self._unavailable(job, error.splitlines()[-1] if error else "the tracking server is unavailable")
                    return
                permanent = rc in (job_module.EXIT_INPUT_ERROR, job_module.EXIT_DENIED)
                self._finish_failed(job, error, retry=not permanent)
                return
        else:
            log.info("job %d: result.json from an earlier attempt; writing it back", job.id, extra=extra)
        self.queue.set_phase(job.id, "writing back")
        self._set_state("busy", job.id, phase="writing back")
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
        except Exception as e:  # noqa: BLE001 - sorted into the three failure classes; result.json is kept
            self._mlflow_failed(job, f"writing back run {run_id}", e, job_dir, extra)
            return
        if gate_result is not None:
            result = {**result, "gate": {"passed": gate_result.passed, "reasons": gate_result.reasons}}
        if not self.settings.keep_outputs:  # already logged to the run: clean up before marking done
            shutil.rmtree(job_dir / "out", ignore_errors=True)
        _remove_attempt_temps(job_dir)
        self.queue.mark_done(job.id, run_id, result)
        self.jobs_done += 1
        log.info("job %d done: run %s", job.id, run_id, extra={**extra, "run_id": run_id})

    def _mlflow_failed(self, job: Job, what: str, e: BaseException, job_dir: Path, extra: dict[str, Any]) -> None:
        """A worker-side MLflow call failed: retry (unavailable), fail now (denied) or use an attempt (bug)."""
        cls = classify(e)
        if cls == UNAVAILABLE:
            self._unavailable(job, f"{what}: {describe(e)}")
        elif cls == DENIED:
            reason = f"MLflow refused {what} (permission or not found): {describe(e)}"
            log.error("job %d: %s; failing without retry", job.id, reason, extra=extra)
            self._finish_failed(job, reason, retry=False, write_back=not isinstance(e, VersionMissing))
        else:
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            try:
                with open(job_dir / f"attempt-{job.attempts}.log", "a", encoding="utf-8") as f:
                    f.write(f"\nsae-mlops worker: unexpected error while {what}:\n{tb}")
            except OSError:
                pass
            log.error("job %d: unexpected error while %s: %s (an attempt is used)", job.id, what, describe(e), extra=extra)
            self._finish_failed(job, f"unexpected error while {what}: {describe(e)}\n{tb[-LOG_TAIL_CHARS:]}", retry=True)

    def _unavailable(self, job: Job, error: str) -> None:
        """The tracking server is unreachable or failing: back to the queue (its place kept) without
        using an attempt, after a delay growing with the outage; failed once the outage is too long."""
        limit = self.settings.tracking_outage_max_s
        current = self.queue.get(job.id)
        since = current.outage_since if current is not None and current.outage_since is not None else time.time()
        elapsed = time.time() - since
        delay = min(max(self.settings.retry_backoff_s, elapsed / 2), self.settings.retry_backoff_max_s)
        delay = max(0.05, min(delay, limit - elapsed + 0.05)) if elapsed < limit else 0.0
        updated = self.queue.mark_unavailable(job.id, error, delay, limit)
        if updated.state == FAILED:
            self.jobs_failed += 1
            log.error("job %d failed: %s", job.id, updated.error, extra={"job_id": job.id})
            self._write_failed(job, updated.error or error)
            return
        log.warning("job %d: tracking server unavailable (%s); retrying in %.1fs without using an attempt "
                    "(outage %.0fs of at most %gs)", job.id, error, delay, elapsed, limit, extra={"job_id": job.id})

    def _finish_failed(self, job: Job, error: str, retry: bool, write_back: bool = True) -> None:
        updated = self.queue.mark_attempt_failed(job.id, error, retry=retry)
        if updated.state != FAILED:
            log.info("job %d will be retried at %s (attempt %d/%d used)", job.id,
                     time.strftime("%H:%M:%S", time.localtime(updated.not_before)), updated.attempts,
                     updated.max_attempts, extra={"job_id": job.id})
            return
        self.jobs_failed += 1
        _remove_attempt_temps(self.settings.jobs_dir / str(job.id))
        log.error("job %d failed for good: %s", job.id, (error or "").splitlines()[0] if error else "", extra={"job_id": job.id})
        if write_back:
            self._write_failed(job, error or "failed")

    def _write_failed(self, job: Job, error: str) -> None:
        try:
            self.registry.write_failed(job.model_name, job.version, job.kind, job.id, error or "failed")
        except Exception as e:  # noqa: BLE001 - the failure stays in the queue; MLflow may be down
            log.warning("job %d: could not write the failure to the registry: %s", job.id, e, extra={"job_id": job.id})

    def _close_runs(self, job: Job) -> None:
        """Runs a dead job process left RUNNING are ended as FAILED (the next attempt makes its own)."""
        try:
            self.registry.close_job_runs(self.settings.experiment, self.queue.job_key(job.id))
        except Exception as e:  # noqa: BLE001 - best effort: the next attempt closes them too
            log.debug("job %d: could not close the runs of the failed attempt: %s", job.id, e, extra={"job_id": job.id})

    # --- the process --------------------------------------------------------------------

    def _spec(self, job: Job, job_dir: Path, result_path: Path) -> dict[str, Any]:
        return {
            "job_id": job.id,
            "job_key": self.queue.job_key(job.id),
            "attempt": job.attempts,
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

    def _run_process(self, job: Job, job_dir: Path, result_path: Path) -> tuple[int, str]:
        tmp = job_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        spec = self._spec(job, job_dir, result_path)
        spec_path = job_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        env[job_module.PARENT_PID_ENV] = str(os.getpid())
        env["TMPDIR"] = str(tmp.resolve())
        env["PYTHONUNBUFFERED"] = "1"
        if self.settings.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.settings.tracking_uri
        apply_http_defaults(self.settings.mlflow_http_timeout_s, self.settings.mlflow_http_max_retries, env)
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
            self._set_state("busy", job.id, proc.pid, phase="analysing")
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

    def _run_actor(self, job: Job, job_dir: Path, result_path: Path) -> tuple[int, str]:
        """The job in the worker's Ray actor (see `ray_executor`); the same (code, error) as `_run_process`."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        from sae_mlops.files import atomic_write_text
        from sae_mlops.service.ray_executor import append_log

        assert self.slot is not None
        log_path = job_dir / f"attempt-{job.attempts}.log"
        spec = {**self._spec(job, job_dir, result_path), "log_path": str(log_path.resolve()),
                "keep_outputs": self.settings.keep_outputs}
        (job_dir / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True), encoding="utf-8")
        timeout = self.settings.timeout_for(job.kind)
        started = time.monotonic()
        deadline = started + timeout
        try:
            info = self._ensure_actor(deadline)
        except RayError as e:
            self.slot.kill()
            return job_module.EXIT_FAILED, f"the Ray actor could not be started: {e}"
        if info is None:
            self.slot.kill()
            return job_module.EXIT_FAILED, f"timed out after {timeout:.0f}s waiting for a Ray actor (killed)"
        pid = info.get("pid")
        self.queue.set_pid(job.id, pid)
        self._set_state("busy", job.id, pid, phase="analysing")
        ref = self.slot.actor.run.remote(spec)
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                break
            if self.stop_event.is_set():
                self.slot.kill()
                raise _Interrupted()
            if time.monotonic() > deadline:
                self.slot.kill()
                return job_module.EXIT_FAILED, f"timed out after {timeout:.0f}s (Ray actor killed)\n{_tail(log_path)}"
        try:
            out = ray.get(ref, timeout=60)
        except RayActorError as e:  # killed, out of memory, node lost: like a killed job process
            self.slot.discard()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return -signal.SIGKILL, f"the Ray actor (pid {pid} on {info.get('host')}) died: {first}\n{_tail(log_path)}"
        except (RayError, GetTimeoutError) as e:
            self.slot.kill()
            return job_module.EXIT_FAILED, f"Ray error: {type(e).__name__}: {e}\n{_tail(log_path)}"
        append_log(log_path, out.get("log"))
        rc = int(out.get("rc", job_module.EXIT_FAILED))
        if rc == 0 and out.get("result") is not None:
            atomic_write_text(result_path, json.dumps(out["result"], indent=2, sort_keys=True))
            return 0, ""
        return rc, f"exit code {rc}\n{_tail(log_path)}"

    def _ensure_actor(self, deadline: float) -> dict[str, Any] | None:
        """The actor's info once it is ready; None at the deadline; _Interrupted on shutdown."""
        from ray.exceptions import GetTimeoutError, RayActorError

        assert self.slot is not None
        while True:
            try:
                return self.slot.ensure(timeout=1.0)
            except GetTimeoutError:
                pass
            except RayActorError as e:  # the warm actor died while idle: start another
                log.warning("%s: the Ray actor died while idle (%s); starting another", self.name,
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                self.slot.discard()
            if self.stop_event.is_set():
                self.slot.kill()
                raise _Interrupted()
            if time.monotonic() > deadline:
                return None

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


def _remove_attempt_temps(job_dir: Path) -> None:
    """The temp folders of the job's Ray attempts (``tmp-<attempt>-<pid>-<time>``, see `ray_executor`):
    an attempt removes its own, but a killed one (timeout, lost actor, an orphan killed by its retry)
    leaves it; once the job is over, every earlier attempt has been killed or fenced (`job.run_job`)."""
    for tmp in job_dir.glob("tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


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
