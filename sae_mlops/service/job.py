"""One analysis job, in its own process: ``python -m sae_mlops.service.job <spec.json>``.

The worker writes the spec (model name, version, kind, options, device, experiment, output and
result paths) and starts this module; a crash or an out-of-memory kill here leaves the service
running. The job analyses ``models:/<name>/<version>`` with the same library call as the CLI
(`sae_mlops.pipeline.run_quick_and_log`, or `run_full_and_log` for a full analysis), so the run
carries the lineage tags of the version, then tags the run with the job id and trigger and writes
``result.json`` (run id, finite metrics, warnings) atomically.

Exit codes: 0 done; 2 the input cannot be analysed (`InputError`: not retried); anything else, a
failure worth retrying. On Linux the process asks to be killed when the service dies
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
    from sae_mlops.errors import InputError

    try:
        result = run_job(spec)
    except InputError as e:
        log.error("job %s cannot run: %s", spec.get("job_id"), e, extra={"job_id": spec.get("job_id")})
        return EXIT_INPUT_ERROR
    except Exception:
        log.exception("job %s failed", spec.get("job_id"), extra={"job_id": spec.get("job_id")})
        return EXIT_FAILED
    from sae_mlops.writers.files import atomic_write_text

    atomic_write_text(Path(spec["result_path"]), json.dumps(result, indent=2, sort_keys=True))
    log.info("job %s done: run %s", spec.get("job_id"), result.get("run_id"), extra={"job_id": spec.get("job_id")})
    return EXIT_OK


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the analysis the spec describes; return what goes into result.json."""
    from sae_mlops import pipeline
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.errors import InputError

    name, version, kind = spec["model_name"], str(spec["version"]), spec["kind"]
    options = dict(spec.get("options") or {})
    full_options = options.pop("full_options", None)
    try:
        cfg = AnalysisConfig(sae=f"models:/{name}/{version}", device=spec.get("device") or "auto", progress=False, **options)
    except (TypeError, InputError) as e:
        raise InputError(f"The policy gives an option AnalysisConfig does not take, or a bad value ({e}); fix the policy file.") from None
    out_dir = Path(spec["out_dir"])
    run_name = f"{kind} {name} v{version}"
    experiment = spec.get("experiment")
    log.info("job %s: %s analysis of models:/%s/%s on %s", spec.get("job_id"), kind, name, version, cfg.device,
             extra={"job_id": spec.get("job_id"), "model": name, "version": version, "kind": kind})
    if kind == "quick":
        outcome = pipeline.run_quick_and_log(cfg, out_dir, track=True, experiment=experiment, run_name=run_name)
    elif kind == "full":
        outcome = pipeline.run_full_and_log(
            cfg, out_dir, opts=_full_options(full_options), track=True, experiment=experiment, run_name=run_name
        )
    else:
        raise InputError(f"Unknown analysis kind {kind!r}; the policy allows quick and full.")

    run_id = outcome.run_id
    metrics = outcome.result.metrics
    warnings = outcome.warnings
    if run_id:
        from sae_mlops.service.mlflow_io import RegistryIO
        from sae_mlops.service.tags import RUN_TAG_JOB_ID, RUN_TAG_TRIGGER

        RegistryIO(spec.get("tracking_uri")).tag_run(
            run_id, {RUN_TAG_JOB_ID: str(spec.get("job_id")), RUN_TAG_TRIGGER: str(spec.get("trigger", ""))}
        )
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
    from sae_mlops.full import FullOptions

    try:
        return FullOptions(**given)
    except (TypeError, InputError) as e:
        raise InputError(f"full_options in the policy has an option the full analysis does not take, or a bad value ({e}); fix the policy file.") from None


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
