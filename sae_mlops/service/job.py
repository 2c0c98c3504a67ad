"""One analysis job, in its own process: ``python -m sae_mlops.service.job <spec.json>``.

The worker writes the spec (model name, version, kind, options, device, experiment, output and
result paths, the job's key and attempt) and starts this module; a crash or an out-of-memory kill
here leaves the service running. The job analyses ``models:/<name>/<version>`` with the same library
call as the CLI (`sae_mlops.workflows.run_quick_and_log`, or `run_full_and_log` for a full analysis),
so the run carries the lineage tags of the version, and writes ``result.json`` (run id, finite
metrics, warnings) atomically.

One writer: first of all the attempt takes the job's output directory (`sae_mlops.outlock`,
``take_over``) and holds it until its run is ended. An orphan of an earlier attempt still writing
there (a Ray actor whose service was killed: Ray Client keeps a vanished driver's actors for its
reconnect grace period) is killed when it runs on this host, else fenced (its next checkpoint write,
its outputs, its logging and its run's end raise `Fenced`), before this attempt reads or closes the
job's runs or resumes its checkpoint.

Exactly once in MLflow: before the analysis the job looks for runs tagged with its key
(``sae_mlops.service.job_key``, one per earlier attempt). A FINISHED one is reused (its metrics go
into ``result.json``; nothing is analysed again); RUNNING ones (an attempt killed while it ran) are
ended as FAILED. Then it creates the attempt's run, tagged with the key, job id, trigger and attempt,
logs into it (``MLFLOW_RUN_ID``) and ends it FINISHED, or FAILED on an exception. A run is RUNNING
only while its attempt's process lives (the worker closes what a killed process left).

Exit codes: 0 done; 2 the input cannot be analysed (`InputError`: not retried); 75 the tracking
server is unreachable or answers 5xx (retried without using an attempt); 77 MLflow refused a call
(401/403/404: not retried); anything else (1), a bug or a crash worth retrying with an attempt. On Linux the process asks to be killed when the service dies
(``PR_SET_PDEATHSIG``), so a restarted service never races an orphaned attempt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("sae_mlops.service.job")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT_ERROR = 2
EXIT_TRACKING_UNAVAILABLE = 75  # EX_TEMPFAIL
EXIT_DENIED = 77  # EX_NOPERM
PARENT_PID_ENV = "SAE_MLOPS_SERVICE_PID"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m sae_mlops.service.job <spec.json>\n")
        return EXIT_INPUT_ERROR
    _die_with_parent()
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    from sae_mlops.service.logs import setup_service_logging

    setup_service_logging(spec.get("log_format", "text"), spec.get("log_level", "INFO"))
    rc, result = execute(spec)
    if rc != EXIT_OK or result is None:
        return rc
    from sae_mlops.files import atomic_write_text

    atomic_write_text(Path(spec["result_path"]), json.dumps(result, indent=2, sort_keys=True))
    log.info("job %s done: run %s", spec.get("job_id"), result.get("run_id"), extra={"job_id": spec.get("job_id")})
    return EXIT_OK


def execute(spec: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """`run_job` with its exceptions sorted into the exit codes above: (code, result or None).

    What the job process runs, and what the service's Ray actors run in-process."""
    from sae_mlops.errors import InputError
    from sae_mlops.service.mlflow_io import DENIED, UNAVAILABLE, classify, describe

    extra = {"job_id": spec.get("job_id")}
    try:
        result = run_job(spec)
    except Exception as e:  # noqa: BLE001 - sorted into the exit codes above
        cls = classify(e)
        if cls == UNAVAILABLE:
            log.error("job %s: the tracking server is unavailable: %s", spec.get("job_id"), describe(e), extra=extra)
            sys.stderr.write(f"tracking server unavailable: {describe(e)}\n")
            return EXIT_TRACKING_UNAVAILABLE, None
        if isinstance(e, InputError):
            log.error("job %s cannot run: %s", spec.get("job_id"), e, extra=extra)
            return EXIT_INPUT_ERROR, None
        if cls == DENIED:
            log.error("job %s: MLflow refused a call (permission or not found): %s", spec.get("job_id"), describe(e), extra=extra)
            return EXIT_DENIED, None
        log.exception("job %s failed", spec.get("job_id"), extra=extra)
        return EXIT_FAILED, None
    return EXIT_OK, result


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the analysis the spec describes; return what goes into result.json."""
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.errors import InputError

    name, version, kind = spec["model_name"], str(spec["version"]), spec["kind"]
    if kind not in ("quick", "full"):
        raise InputError(f"Unknown analysis kind {kind!r}; the policy allows quick and full.")
    options = dict(spec.get("options") or {})
    full_options = options.pop("full_options", None)
    probe_options = options.pop("probe_options", None)
    try:
        cfg = AnalysisConfig(sae=f"models:/{name}/{version}", device=spec.get("device") or "auto", progress=False, **options)
    except (TypeError, InputError) as e:
        raise InputError(f"The policy gives an option AnalysisConfig does not take, or a bad value ({e}); fix the policy file.") from None
    full_opts = _full_options(full_options) if kind == "full" else None  # bad options: InputError before any run
    probe_opts = _probe_options(probe_options)
    out_dir = Path(spec["out_dir"])
    run_name = f"{kind} {name} v{version}"
    experiment = spec.get("experiment") or "sae-mlops-service"
    job_key = str(spec.get("job_key") or spec.get("job_id"))
    from sae_mlops.outlock import exclusive_out_dir
    from sae_mlops.service.mlflow_io import RegistryIO

    registry = RegistryIO(spec.get("tracking_uri"))

    # Fence first: an orphan of an earlier attempt (a Ray actor whose service was killed) is killed
    # (same host) or fenced before this attempt reads or closes the job's runs or its checkpoint, and
    # the directory stays held until this attempt's run is ended.
    with exclusive_out_dir(out_dir, option="the job's output directory", take_over=True):
        return _run_attempt(spec, registry, cfg, kind, name, version, out_dir, run_name, experiment, job_key,
                            full_opts, probe_opts)


def _run_attempt(spec: dict[str, Any], registry: Any, cfg: Any, kind: str, name: str, version: str, out_dir: Path,
                 run_name: str, experiment: str, job_key: str, full_opts: Any, probe_opts: Any) -> dict[str, Any]:
    """`run_job` once this attempt holds the job's output directory."""
    from sae_mlops import workflows as pipeline
    from sae_mlops.outlock import check_fence
    from sae_mlops.service.tags import RUN_TAG_ATTEMPT, RUN_TAG_JOB_ID, RUN_TAG_JOB_KEY, RUN_TAG_TRIGGER

    job_id = spec.get("job_id")
    earlier = registry.job_runs(experiment, job_key)
    finished = [r for r in earlier if r.info.status == "FINISHED"]
    registry.close_job_runs(experiment, job_key)
    if finished:
        run_id = finished[0].info.run_id
        log.info("job %s: run %s of an earlier attempt is FINISHED; reusing it", job_id, run_id, extra={"job_id": job_id})
        return _result(spec, kind, run_id, registry.run_metrics(run_id), ["result taken from the earlier attempt's run"])
    run_id = registry.create_job_run(experiment, run_name, {
        RUN_TAG_JOB_KEY: job_key,
        RUN_TAG_JOB_ID: str(job_id),
        RUN_TAG_TRIGGER: str(spec.get("trigger", "")),
        RUN_TAG_ATTEMPT: str(spec.get("attempt", "")),
    })
    previous = os.environ.get("MLFLOW_RUN_ID")
    os.environ["MLFLOW_RUN_ID"] = run_id  # the tracking layer logs into this run and leaves it open
    log.info("job %s: %s analysis of models:/%s/%s on %s into run %s", job_id, kind, name, version, cfg.device, run_id,
             extra={"job_id": job_id, "model": name, "version": version, "kind": kind, "run_id": run_id})
    try:
        if finished_outputs(out_dir, kind):
            # an earlier attempt finished the analysis but could not log it (a tracking outage):
            # log its files into this attempt's run instead of analysing again
            log.info("job %s: the outputs of an earlier attempt are complete in %s; logging them without a new analysis",
                     job_id, out_dir, extra={"job_id": job_id})
            outcome = pipeline.log_existing(out_dir, experiment=experiment, run_name=run_name)
        elif kind == "quick":
            outcome = pipeline.run_quick_and_log(cfg, out_dir, track=True, experiment=experiment, run_name=run_name,
                                                 take_over_out=True)
        else:
            outcome = pipeline.run_full_and_log(
                cfg, out_dir, opts=full_opts, track=True, experiment=experiment, run_name=run_name, take_over_out=True
            )
        if outcome.run_id and outcome.run_id != run_id:
            raise RuntimeError(f"the analysis logged into run {outcome.run_id}, not the job's run {run_id}")
        if probe_opts is not None:  # the policy's probe_options: k-sparse probing into the same run
            from sae_mlops.config import EvalRunOptions, EvalTarget

            target = EvalTarget(**{f: getattr(cfg, f) for f in ("sae", "sae_id", "model", "hook", "context_size", "prepend_bos",
                                                                "topk_mode", "threshold", "batch_size", "device", "dtype")})
            probed = pipeline.run_probe_and_log(target, probe_opts, EvalRunOptions(out=str(out_dir / "probe"), run_id=run_id, quiet=True))
            outcome.result.metrics.update(probed.metrics)
        check_fence(out_dir)  # an orphan fenced during its analysis must not end its run FINISHED
    except BaseException:
        try:
            registry.end_run(run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - the worker (or the next attempt) closes it
            log.warning("job %s: could not end run %s as FAILED: %s", job_id, run_id, e, extra={"job_id": job_id})
        raise
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = previous
    registry.end_run(run_id, "FINISHED")
    return _result(spec, kind, run_id, outcome.result.metrics, outcome.warnings)


def finished_outputs(out_dir: Path, kind: str) -> bool:
    """Whether `out_dir` holds the complete outputs of a `kind` analysis: a results JSON of that kind
    and a SUMMARY, no checkpoint of an unfinished pass, no partial files."""
    results = sorted((out_dir / "results").glob("analysis_results*.json")) if out_dir.is_dir() else []
    if not results or not any(out_dir.glob("SUMMARY*")) or (out_dir / "checkpoint").exists():
        return False
    if any(p.name.endswith((".partial", ".part")) for p in out_dir.rglob("*")):
        return False
    try:
        return json.loads(results[-1].read_text(encoding="utf-8")).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def _result(spec: dict[str, Any], kind: str, run_id: str | None, metrics: dict[str, Any], warnings: list[Any]) -> dict[str, Any]:
    return {
        "job_id": spec.get("job_id"),
        "kind": kind,
        "run_id": run_id,
        "metrics": {str(k): float(v) for k, v in metrics.items() if _finite(v)},
        "warnings": [str(w) for w in warnings],
    }


def _full_options(given: dict[str, Any] | None):
    """`FullOptions` from the policy's ``full_options`` mapping (None: the defaults)."""
    if not given:
        return None
    from sae_mlops.errors import InputError
    from sae_mlops.analyses.full import FullOptions

    try:
        return FullOptions(**given)
    except (TypeError, InputError) as e:
        raise InputError(f"full_options in the policy has an option the full analysis does not take, or a bad value ({e}); fix the policy file.") from None


def _probe_options(given: dict[str, Any] | None):
    """`ProbeOptions` from the policy's ``probe_options`` mapping (None: no probing)."""
    if given is None:
        return None
    from sae_mlops.config import ProbeOptions
    from sae_mlops.errors import InputError

    try:
        return ProbeOptions(**given)
    except (TypeError, InputError) as e:
        raise InputError(f"probe_options in the policy has an option probing does not take, or a bad value ({e}); fix the policy file.") from None


def _finite(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the service process dies; exit now if it already has."""
    expected = os.environ.get(PARENT_PID_ENV)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if expected and str(os.getppid()) != expected:
        os._exit(EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
