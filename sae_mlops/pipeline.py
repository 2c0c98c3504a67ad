"""One call per user action, shared by the CLI, the MLproject entry points and (later) the service.

`run_quick_and_log` = `analysis.run_quick` -> `writers.quick.write_quick_outputs` ->
`tracking.runs.log_analysis`; `run_full_and_log` = `full.run_full` (pass and writers) ->
`tracking.runs.log_analysis`. They hold no analysis logic and do not parse arguments; they only
decide where outputs go and wire the steps together.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sae_mlops.config import AnalysisConfig

if TYPE_CHECKING:
    from sae_mlops.full import FullOptions
    from sae_mlops.results import AnalysisResult

log = logging.getLogger(__name__)

DEFAULT_ANALYSIS_ROOT = Path("analysis")


@dataclass
class QuickOutcome:
    result: AnalysisResult
    out_dir: Path
    files: list[Path]
    run_id: str | None = None  # None when tracking was off
    tracking_uri: str | None = None
    warnings: list[str] = field(default_factory=list)


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def sae_label(sae: str, sae_id: str | None = None) -> str:
    """A directory-safe name for what the user called the SAE.

    A local path gives its directory name; a URI or release name is flattened
    (``runs:/abc/sae`` -> ``runs_abc_sae``).
    """
    s = sae.rstrip("/\\")
    p = Path(s)
    if "://" not in s and ":/" not in s and p.name:
        name = p.name
    else:
        name = s
    if sae_id:
        name = f"{name}__{sae_id}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sae"
    return name[:120]


def default_out_dir(cfg: AnalysisConfig, kind: str = "quick", root: Path = DEFAULT_ANALYSIS_ROOT) -> Path:
    """``analysis/<sae dir name>/<kind>_<UTC timestamp>`` (relative to the working directory)."""
    return root / sae_label(cfg.sae, cfg.sae_id) / f"{kind}_{utc_timestamp()}"


def run_quick_and_log(
    cfg: AnalysisConfig,
    out_dir: Path | str | None = None,
    *,
    track: bool = True,
    experiment: str | None = None,
    run_name: str | None = None,
) -> QuickOutcome:
    """Run the quick analysis, write its files under `out_dir`, and log it all to MLflow.

    out_dir: None -> `default_out_dir(cfg)`.
    track: False skips MLflow entirely (files are still written).
    experiment / run_name: for a new MLflow run; ignored when ``MLFLOW_RUN_ID`` is set (``mlflow run``).
    """
    from sae_mlops.analysis import run_quick
    from sae_mlops.writers.quick import write_quick_outputs

    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    started = _now_ms()
    with _interruption_report(out, "quick"):
        result = run_quick(cfg)
        out.mkdir(parents=True, exist_ok=True)
        files = [Path(f) for f in write_quick_outputs(result, out)]
        log.info("Wrote %d file(s) under %s", len(files), out)
        outcome = QuickOutcome(result=result, out_dir=out, files=files, warnings=list(result.warnings))
        if track:
            import mlflow

            from sae_mlops.tracking.runs import log_analysis

            outcome.run_id = log_analysis(result, files, out, experiment=experiment, run_name=run_name, start_time=started)
            outcome.tracking_uri = mlflow.get_tracking_uri()
    return outcome


@contextmanager
def _interruption_report(out: Path, kind: str):
    """Turn Ctrl-C into `AnalysisInterrupted` whose message says in one line what is left: the
    complete files under `out` (temporary ``.part``/``.partial`` ones are removed by the writers) and
    whether an MLflow run was made (runs are created only after the work, and end FAILED when
    logging is interrupted)."""
    from sae_mlops.errors import AnalysisInterrupted

    try:
        yield
    except AnalysisInterrupted:
        raise
    except KeyboardInterrupt as exc:
        done = [p for p in out.rglob("*") if p.is_file() and ".part" not in p.name] if out.is_dir() else []
        db = any(p.name == "manifest.json" for p in done)
        if not done:
            left = f"nothing written under {out} and no MLflow run"
        else:
            left = f"{len(done)} complete file(s) under {out}" + (" (the activation database is complete)" if db else "") + \
                ", no finished MLflow run (a run being logged is marked FAILED)"
        raise AnalysisInterrupted(f"{kind} analysis interrupted: {left}; run it again to get the full results.") from exc


def _now_ms() -> int:
    """Milliseconds since the epoch: a run's start time is when its analysis started."""
    return int(time.time() * 1000)


@dataclass
class FullOutcome(QuickOutcome):
    """A quick outcome plus where the full analysis's main files are (None if not written)."""

    summary: Path | None = None  # SUMMARY.json
    report: Path | None = None  # README.md
    database: Path | None = None  # activation_database/activation_db


def check_full_options(opts: FullOptions) -> None:
    """Sizes `run_full` does not check itself; raise `InputError` before any work."""
    from sae_mlops.errors import InputError

    for name, low in (("neighbours", 1), ("logit_lens_tokens", 1), ("heatmap_features", 2), ("dense_limit", 0), ("shard_rows", 1)):
        value = getattr(opts, name)
        if value < low:
            raise InputError(f"{name.replace('_', ' ')} must be at least {low}, got {value}.")


def run_full_and_log(
    cfg: AnalysisConfig,
    out_dir: Path | str | None = None,
    *,
    opts: FullOptions | None = None,
    track: bool = True,
    experiment: str | None = None,
    run_name: str | None = None,
) -> FullOutcome:
    """Run the full analysis (one pass; database, matrices, summaries, plots, reports under `out_dir`)
    and log it to MLflow: the quick metrics under the same names, and every file as an artifact at its
    path relative to `out_dir` (the run's artifacts have the directory's layout).

    out_dir: None -> `default_out_dir(cfg, "full")`. opts: None -> `FullOptions()` defaults.
    track / experiment / run_name: as for `run_quick_and_log`.
    """
    from sae_mlops.full import FullOptions

    opts = opts or FullOptions()
    check_full_options(opts)
    out = Path(out_dir) if out_dir else default_out_dir(cfg, "full")
    started = _now_ms()
    with _interruption_report(out, "full"):
        return _full_and_log(cfg, out, opts, track, experiment, run_name, started)


def _full_and_log(
    cfg: AnalysisConfig, out: Path, opts: FullOptions, track: bool, experiment: str | None, run_name: str | None, started: int
) -> FullOutcome:
    from sae_mlops.full import run_full

    outputs = run_full(cfg, out, opts)
    files = [Path(f) for f in outputs.files]
    log.info("Wrote %d file(s) under %s", len(files), out)
    result = outputs.result
    outcome = FullOutcome(result=result, out_dir=out, files=files, warnings=list(result.warnings))
    for f in files:
        if f.parent == out and f.name.startswith("SUMMARY") and f.suffix == ".json":
            outcome.summary = f
        elif f.parent == out and f.name.startswith("README") and f.suffix == ".md":
            outcome.report = f
        elif f.name == "manifest.json" and f.parent.parent.name == "activation_database":
            outcome.database = f.parent
    if track:
        import mlflow

        from sae_mlops.tracking.runs import log_analysis

        outcome.run_id = log_analysis(result, files, out, experiment=experiment, run_name=run_name, start_time=started)
        outcome.tracking_uri = mlflow.get_tracking_uri()
    return outcome
