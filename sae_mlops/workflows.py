"""One call per user action, shared by the CLI, the MLproject entry points and (later) the service.

`run_quick_and_log` = `analysis.run_quick` -> `writers.quick.write_quick_outputs` ->
`tracking.runs.log_analysis`; `run_full_and_log` = `full.run_full` (pass and writers) ->
`tracking.runs.log_analysis`. They hold no analysis logic and do not parse arguments; they only
decide where outputs go and wire the steps together.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sae_mlops.config import AnalysisConfig, ExecutionOptions
from sae_mlops.naming import utc_timestamp

if TYPE_CHECKING:
    from sae_mlops.analyses.full import FullOptions
    from sae_mlops.core.results import AnalysisResult

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
    exec_opts: ExecutionOptions | None = None,
    resume: str | Path | None = None,
    take_over_out: bool = False,
) -> QuickOutcome:
    """Run the quick analysis, write its files under `out_dir`, and log it all to MLflow.

    out_dir: None -> `default_out_dir(cfg)`.
    track: False skips MLflow entirely (files are still written).
    experiment / run_name: for a new MLflow run; ignored when ``MLFLOW_RUN_ID`` is set (``mlflow run``).
    exec_opts: how the pass runs (local or Ray, shard size). resume: an output directory holding an
    unfinished analysis to continue (`out_dir` is then that directory). The MLflow run is created
    when the pass starts (RUNNING, with a ``progress/tokens_done`` metric per shard) and finished,
    failed or killed with the analysis. The output directory is held for the whole call
    (`sae_mlops.outlock`: a second command into it is refused; take_over_out: the service's new
    attempt kills and fences an orphan of an earlier one).
    """
    out = _resolve_out(cfg, "quick", out_dir, resume)
    observer = RunObserver("quick", cfg, experiment, run_name, _now_ms(), out) if track else None
    with interrupt_report(out, track, "quick", observer):  # a Ctrl-C in the preflight or the imports too
        preflight(out, track, no_track_option=True)
        from sae_mlops.analyses.ray_shards import local_ray_prestarted
        from sae_mlops.outlock import exclusive_out_dir

        exec_opts = exec_opts or ExecutionOptions()
        with (exclusive_out_dir(out, option="--resume" if resume is not None else "--out", take_over=take_over_out),
              local_ray_prestarted(exec_opts)):  # a local Ray instance (--executor ray) starts during the imports
            import sae_mlops.tracking.resolve  # noqa: F401 (registers the resolver of runs:/ and models:/ SAE URIs)
            from sae_mlops.analyses.quick import run_quick
            from sae_mlops.analyses.sharding import CHECKPOINT_DIR
            from sae_mlops.outputs.summaries import write_quick_outputs

            started = _now_ms()  # after the imports: they are in time/startup
            started_s = time.perf_counter()
            if observer is not None:
                observer.start_time = started
            result = run_quick(cfg, out, exec_opts, resume=resume is not None, observer=observer)
            out.mkdir(parents=True, exist_ok=True)
            t_reports = time.perf_counter()
            from sae_mlops.outlock import check_fence

            check_fence(out)
            files = [Path(f) for f in write_quick_outputs(result, out)]
            result.metrics["time/reports"] = time.perf_counter() - t_reports  # logged to MLflow, not in the JSON
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
            log.info("Wrote %d file(s) under %s", len(files), out)
            outcome = QuickOutcome(result=result, out_dir=out, files=files, warnings=list(result.warnings))
            t_log = time.perf_counter()
            if track:
                log_outcome(outcome, experiment, run_name, start_time=started, run_id=observer.run_id if observer else None)
            _log_total(outcome, started_s, time.perf_counter() - t_log if track else 0.0)
    return outcome


def _resolve_out(cfg: AnalysisConfig, kind: str, out_dir: Path | str | None, resume: str | Path | None) -> Path:
    """The output directory: ``resume`` (which must agree with ``out_dir`` when both are given),
    else ``out_dir``, else `default_out_dir`."""
    from sae_mlops.errors import InputError

    if resume is not None:
        if out_dir and Path(out_dir).resolve() != Path(resume).resolve():
            raise InputError(f"--resume {resume} and --out {out_dir} differ; --resume continues in its own directory, "
                             "give only one of them.")
        return Path(resume)
    return Path(out_dir) if out_dir else default_out_dir(cfg, kind)


class RunObserver:
    """The MLflow side of a sharded pass (`sae_mlops.analyses.sharding.PassObserver`): creates (or, on
    resume, reopens) the analysis's run when the pass starts, records its id in the checkpoint, and
    logs ``progress/tokens_done`` after every shard. A tracking failure while the pass runs is
    logged once as a warning and does not stop the analysis (it surfaces when the results are logged)."""

    def __init__(self, kind: str, cfg: AnalysisConfig, experiment: str | None, run_name: str | None, start_time: int,
                 out: Path | None = None):
        self.kind, self.cfg, self.out = kind, cfg, out
        self.experiment, self.run_name, self.start_time = experiment, run_name, start_time
        self.run_id: str | None = None
        self.owned = False
        self._warned = False

    def started(self, checkpoint, total_tokens: int) -> None:
        from sae_mlops.naming import run_title, sae_name
        from sae_mlops.tracking.runs import start_analysis_run

        fp = checkpoint.fingerprint
        info = checkpoint.sae_info
        name = run_title(self.kind, sae_name(self.cfg.sae, self.cfg.sae_id), info.get("architecture"), info.get("d_sae"),
                         info.get("k"))
        tags = {"sae_mlops.kind": self.kind}
        if fp.get("sae_hash"):
            tags["sae_mlops.sae_hash"] = str(fp["sae_hash"])
        note = (f"{self.kind} analysis of `{self.cfg.sae}`; `progress/fraction` (Model metrics) shows how far the "
                f"pass is ({len(checkpoint.plan)} shards of {total_tokens:,} tokens). If it stops, run the same command "
                f"again or add `--resume {self.out}` to continue from the last finished shard.")
        try:
            self.run_id, self.owned = start_analysis_run(checkpoint.run_id, name, tags, self.experiment, self.run_name,
                                                         self.start_time, note=note)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            self._warn(e)
            return
        checkpoint.run_id = self.run_id
        self.progress(checkpoint.tokens_done, total_tokens)

    def progress(self, tokens_done: int, total_tokens: int) -> None:
        """Log progress; the store is asked first with a 2 s health check (MLflow's client would retry
        a dead server for minutes, holding up the pass), and after a failure no more progress is sent."""
        if self.run_id is None or self._warned:
            return
        from sae_mlops.tracking.preflight import check_tracking_store
        from sae_mlops.tracking.runs import log_progress

        try:
            check_tracking_store(timeout_s=2.0)
            log_progress(self.run_id, tokens_done, total_tokens)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            self._warn(e)

    def ended(self, status: str) -> None:
        if self.run_id and self.owned:
            from sae_mlops.tracking.runs import end_run

            end_run(self.run_id, status)

    def _warn(self, e: Exception) -> None:
        if not self._warned:
            log.warning("MLflow did not take the running analysis's progress (%s: %s); the analysis goes on",
                        type(e).__name__, str(e)[:200])
            self._warned = True


def _log_total(outcome: QuickOutcome, started: float, logging_seconds: float) -> None:
    """``time/logging`` (MLflow logging; 0 when tracking is off), ``time/total`` (process start to
    now; from this call when /proc is missing) and ``time/pass_share`` (``time/pass / time/total``)
    into the result, and into the run when there is one. They are not in the results JSON, which
    is written before logging."""
    m = outcome.result.metrics
    m["time/logging"] = logging_seconds
    m["time/total"] = (m.get("time/startup") or 0.0) + (time.perf_counter() - started)
    m["time/pass_share"] = m.get("time/pass", 0.0) / m["time/total"] if m["time/total"] > 0 else 0.0
    if outcome.run_id:
        from sae_mlops.tracking.runs import log_metrics

        log_metrics(outcome.run_id, {k: m[k] for k in ("time/logging", "time/total", "time/pass_share")})


def preflight(out: Path | str | None, track: bool, no_track_option: bool = False) -> None:
    """Before anything loads: the output directory (if given) can be created (`InputError`) and, when
    tracking, the tracking store answers within seconds (`TrackingError`); when the run exists
    already (``MLFLOW_RUN_ID``), the store's client is loaded now (`open_store`), so that a Ctrl-C
    during the model load marks it KILLED at once. Leaves nothing behind.
    no_track_option: the command has --no-track, so the message may offer it."""
    from sae_mlops.preflight import check_out_dir

    if out is not None:
        check_out_dir(out)
    if track:
        from sae_mlops.tracking.preflight import check_tracking_store, open_store

        check_tracking_store(no_track_option=no_track_option)
        if os.environ.get("MLFLOW_RUN_ID"):  # the run exists already: a Ctrl-C from now on must mark it KILLED promptly
            open_store()


def log_outcome(outcome: QuickOutcome, experiment: str | None, run_name: str | None, start_time: int | None = None,
                run_id: str | None = None) -> None:
    """Log a written analysis to MLflow; a failure becomes a `TrackingError` that says where the
    results are and how to log them later (`sae-mlops log OUT`)."""
    from sae_mlops.errors import TrackingError
    from sae_mlops.tracking.preflight import describe_uri, tracking_uri
    from sae_mlops.tracking.runs import log_analysis

    uri = tracking_uri()
    try:
        from sae_mlops.tracking.preflight import check_tracking_store

        check_tracking_store(timeout_s=3.0)  # a store lost during the analysis fails here in seconds
        outcome.run_id = log_analysis(
            outcome.result, outcome.files, outcome.out_dir, experiment=experiment, run_name=run_name, start_time=start_time,
            run_id=run_id,
        )
    except Exception as e:
        log.debug("logging to MLflow failed", exc_info=True)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise TrackingError(
            f"the analysis finished and its files are in {outcome.out_dir}, but logging them to MLflow at "
            f"{describe_uri(uri)} failed ({type(e).__name__}: {reason}); log them later with `sae-mlops log {outcome.out_dir}`."
        ) from e
    outcome.tracking_uri = uri


@contextmanager
def interrupt_report(out: Path, track: bool, kind: str = "the", observer: RunObserver | None = None) -> Iterator[None]:
    """Turn Ctrl-C (SIGINT) into `Interrupted` with one sentence saying what was left behind: the
    checkpoint of finished shards under `out` (and how to resume), partial files, or none; and the
    MLflow run, marked KILLED when one exists (the analysis's run, created when the pass started, or
    the run of ``MLFLOW_RUN_ID``). Any other error marks the analysis's own run FAILED."""
    from sae_mlops.errors import AnalysisInterrupted, Interrupted

    try:
        yield
    except Interrupted:
        if observer is not None:
            observer.ended("KILLED")
        raise
    except KeyboardInterrupt as e:
        run_id = getattr(e, "mlflow_run_id", None) or (observer.run_id if observer else None) or (
            os.environ.get("MLFLOW_RUN_ID") if track else None)
        done = _finished_shards(out)
        if not done:  # a checkpoint without a finished shard holds nothing worth resuming
            _drop_checkpoint(out)
        from sae_mlops.outlock import is_lock_file

        files = sorted(p for p in out.rglob("*") if p.is_file() and not is_lock_file(p)) if out.is_dir() else []
        if done:
            left = (f"{out} holds a checkpoint of {done} finished shard(s); run the same command again "
                    f"(or with --resume {out}) to continue from there")
        elif not files:
            left = f"nothing was written to {out}"
        elif getattr(e, "mlflow_run_id", None):
            left = f"the files in {out} are complete; log them again with `sae-mlops log {out}`"
        else:
            left = f"{out} holds {len(files)} partial file(s) of an unfinished analysis: delete it"
        if run_id:
            from sae_mlops.tracking.preflight import mark_killed

            killed = mark_killed(run_id)
            run = f"MLflow run {run_id} was marked KILLED" if killed else f"MLflow run {run_id} could not be marked KILLED"
        elif track:
            run = "no MLflow run was created (the run is created when the pass starts)"
        else:
            run = "nothing was tracked (--no-track)"
        raise AnalysisInterrupted(f"{kind} analysis interrupted: {left}; {run}.") from None
    except OSError as e:
        if observer is not None:
            observer.ended("FAILED")
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(out, e) from e
    except BaseException:
        if observer is not None:
            observer.ended("FAILED")
        raise


def _disk_full(out: Path, e: OSError) -> Exception:
    """`DiskFull`: one sentence saying the disk is full, what was kept and how to continue."""
    from sae_mlops.analyses.sharding import CHECKPOINT_DIR
    from sae_mlops.errors import DiskFull

    where = f" while writing {Path(e.filename).name}" if e.filename else ""
    free = ""
    try:
        free = f", {shutil.disk_usage(out).free / 2**20:,.0f} MiB free"
    except OSError:
        pass
    done = _finished_shards(out)
    if done:
        kept = (f"the checkpoint in {out / CHECKPOINT_DIR} ({done} finished shard(s)) is intact: free some space and "
                f"run the same command again (or with --resume {out}) to continue without redoing them")
    else:
        kept = "free some space (or choose another --out) and run the command again"
    return DiskFull(f"the disk holding {out} is full ({e.strerror or 'no space left'}{where}{free}); {kept}.")


def _drop_checkpoint(out: Path) -> None:
    """Remove ``out``'s checkpoint, and ``out`` itself when that leaves it empty."""
    from sae_mlops.analyses.sharding import CHECKPOINT_DIR

    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    try:
        out.rmdir()  # only when empty
    except OSError:
        pass


def _finished_shards(out: Path) -> int:
    """Shards recorded as finished in ``out``'s checkpoint (0 when there is none)."""
    import json

    from sae_mlops.analyses.sharding import CHECKPOINT_DIR

    manifest = out / CHECKPOINT_DIR / "manifest.json"
    try:
        return len(json.loads(manifest.read_text(encoding="utf-8")).get("done", {}))
    except (OSError, ValueError):
        return 0


@dataclass
class FullOutcome(QuickOutcome):
    """A quick outcome plus where the full analysis's main files are (None if not written)."""

    summary: Path | None = None  # SUMMARY.json
    report: Path | None = None  # README.md
    database: Path | None = None  # activation_database/activation_db


def run_full_and_log(
    cfg: AnalysisConfig,
    out_dir: Path | str | None = None,
    *,
    opts: FullOptions | None = None,
    track: bool = True,
    experiment: str | None = None,
    run_name: str | None = None,
    exec_opts: ExecutionOptions | None = None,
    resume: str | Path | None = None,
    take_over_out: bool = False,
) -> FullOutcome:
    """Run the full analysis (one pass; database, matrices, summaries, plots, reports under `out_dir`)
    and log it to MLflow: the quick metrics under the same names, and every file as an artifact at its
    path relative to `out_dir` (the run's artifacts have the directory's layout).

    out_dir: None -> `default_out_dir(cfg, "full")`. opts: None -> `FullOptions()` defaults.
    track / experiment / run_name / exec_opts / resume / take_over_out: as for `run_quick_and_log`.
    """
    out = _resolve_out(cfg, "full", out_dir, resume)
    observer = RunObserver("full", cfg, experiment, run_name, _now_ms(), out) if track else None
    with interrupt_report(out, track, "full", observer):  # a Ctrl-C in the preflight or the imports too
        preflight(out, track, no_track_option=True)
        from sae_mlops.analyses.ray_shards import local_ray_prestarted
        from sae_mlops.outlock import exclusive_out_dir

        exec_opts = exec_opts or ExecutionOptions()
        with (exclusive_out_dir(out, option="--resume" if resume is not None else "--out", take_over=take_over_out),
              local_ray_prestarted(exec_opts)):  # a local Ray instance (--executor ray) starts during the imports
            import sae_mlops.tracking.resolve  # noqa: F401 (registers the resolver of runs:/ and models:/ SAE URIs)
            from sae_mlops.analyses.full import FullOptions

            opts = opts or FullOptions()  # bounds are checked when FullOptions is built (sae_mlops.config)
            started = _now_ms()  # after the imports: they are in time/startup
            started_s = time.perf_counter()
            if observer is not None:
                observer.start_time = started
            return _run_full_and_log(cfg, out, opts, track, experiment, run_name, started, started_s, exec_opts,
                                     resume is not None, observer)


def _run_full_and_log(
    cfg: AnalysisConfig, out: Path, opts: FullOptions, track: bool, experiment: str | None, run_name: str | None,
    started: int,
    started_s: float,
    exec_opts: ExecutionOptions | None = None,
    resume: bool = False,
    observer: RunObserver | None = None,
) -> FullOutcome:
    from sae_mlops.analyses.full import run_full

    outputs = run_full(cfg, out, opts, exec_opts=exec_opts, resume=resume, observer=observer)
    files = [Path(f) for f in outputs.files]
    result = outputs.result
    if opts.dashboards:
        files += _dashboards(out, opts.dashboards, result)
    log.info("Wrote %d file(s) under %s", len(files), out)
    outcome = FullOutcome(result=result, out_dir=out, files=files, warnings=list(result.warnings))
    for f in files:
        if f.parent == out and f.name.startswith("SUMMARY") and f.suffix == ".json":
            outcome.summary = f
        elif f.parent == out and f.name.startswith("README") and f.suffix == ".md":
            outcome.report = f
        elif f.name == "manifest.json" and f.parent.parent.name == "activation_database":
            outcome.database = f.parent
    t_log = time.perf_counter()
    if track:
        from sae_mlops.outlock import check_fence

        check_fence(out)
        log_outcome(outcome, experiment, run_name, start_time=started, run_id=observer.run_id if observer else None)
    _log_total(outcome, started_s, time.perf_counter() - t_log if track else 0.0)
    return outcome


def _dashboards(out: Path, top: int, result: AnalysisResult) -> list[Path]:
    """`--dashboards N`: the feature pages of the N most frequent features under ``out/dashboard``;
    their timing metrics and the index tag go into the result, so they are logged with the run."""
    from sae_mlops.features.dashboard import write_dashboards
    from sae_mlops.tracking.features import TAG_DASHBOARD

    dash = write_dashboards(out, out / "dashboard", top=top)
    result.metrics.update(dash.metrics())
    result.tags[TAG_DASHBOARD] = "dashboard/index.html"
    return [Path(f) for f in dash.files]


def _now_ms() -> int:
    """Milliseconds since the epoch: a run's start time is when its analysis started."""
    return int(time.time() * 1000)


def log_existing(out_dir: Path | str, *, experiment: str | None = None, run_name: str | None = None) -> QuickOutcome:
    """Log an analysis output directory written earlier (e.g. with --no-track, or when tracking failed)
    to MLflow as a new run: its results JSON as params, metrics and tags, every file under it as an
    artifact at its relative path. `InputError` when the directory is not a finished analysis."""
    import json

    from sae_mlops.errors import InputError
    from sae_mlops.core.results import AnalysisResult

    out = Path(out_dir)
    hint = "give the output directory of a finished `sae-mlops quick` or `sae-mlops full`"
    if not out.is_dir():
        raise InputError(f"'{out}' is not a directory; {hint}.")
    results = sorted((out / "results").glob("analysis_results*.json"))
    if not results or not any(out.glob("SUMMARY*")):
        raise InputError(f"'{out}' holds no finished analysis (no results/analysis_results.json and SUMMARY); {hint}.")
    if any(p.name.endswith((".partial", ".part")) for p in out.rglob("*")):
        raise InputError(f"'{out}' holds partial files of an interrupted analysis; run the analysis again, then log it.")
    try:
        result = AnalysisResult.from_json_dict(json.loads(results[-1].read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"'{results[-1]}' is not a readable results file ({type(e).__name__}); {hint}.") from None
    from sae_mlops.outlock import exclusive_out_dir, is_lock_file
    from sae_mlops.tracking.preflight import check_tracking_store

    check_tracking_store()
    with exclusive_out_dir(out, option="the directory"):  # not while an analysis still writes there
        files = sorted(p for p in out.rglob("*") if p.is_file() and not is_lock_file(p))
        outcome = QuickOutcome(result=result, out_dir=out, files=files, warnings=list(result.warnings))
        log_outcome(outcome, experiment, run_name)
    return outcome


# --- evals (sae_mlops.evals): `sae-mlops probe` and `sae-mlops evals` -----------------------------


@dataclass
class EvalOutcome:
    out_dir: Path
    metrics: dict[str, float]
    files: list[Path]
    seconds: dict[str, float]
    messages: dict[str, str]
    run_id: str | None = None
    analysis: QuickOutcome | None = None
    cache_hits: int = 0
    cache_misses: int = 0


def _eval_tags(loaded_sae) -> dict[str, str]:
    from sae_mlops.tracking.lineage import TAG_SAE_HASH

    tags = {k: str(v) for k, v in (loaded_sae.info.lineage or {}).items()}
    if loaded_sae.info.content_hash:
        tags[TAG_SAE_HASH] = loaded_sae.info.content_hash
    return tags


def _eval_params(loaded, popts=None) -> dict[str, str]:
    p = {"sae": loaded.target.sae, "model": loaded.model.name, "hook": loaded.engine.site.name,
         "context_size": str(loaded.context_size), "prepend_bos": str(loaded.prepend_bos),
         "sae_architecture": loaded.sae.info.architecture, "d_sae": str(loaded.sae.info.d_sae)}
    if popts is not None:
        p.update({"probe_datasets": popts.datasets, "probe_pooling": popts.pooling, "probe_ks": popts.ks,
                  "probe_test_fraction": str(popts.test_fraction), "probe_seed": str(popts.seed)})
    return p


def run_probe_and_log(target, popts, ropts) -> EvalOutcome:
    """`sae-mlops probe`: k-sparse probing of one SAE (`sae_mlops.evals.run.run_probe`), files under the
    output directory, logged to ``--run-id`` or a new ``probe`` run linked to the SAE's analysis run."""
    from sae_mlops.evals.run import EvalsResult, load_target, run_probe, write_report
    from sae_mlops.naming import sae_name

    out = Path(ropts.out) if ropts.out else DEFAULT_ANALYSIS_ROOT / sae_label(target.sae, target.sae_id) / f"probe_{utc_timestamp()}"
    preflight(out, not ropts.no_track, no_track_option=True)
    import sae_mlops.tracking.resolve  # noqa: F401 (registers the resolver of runs:/ and models:/ SAE URIs)

    loaded = load_target(target)
    result = EvalsResult()
    out.mkdir(parents=True, exist_ok=True)
    run_probe(loaded, popts, out, result)
    result.metrics["time/eval_probe"] = result.seconds["probe"]
    files = result.files + write_report(result, out, target.sae)
    run_id = None
    if not ropts.no_track:
        from sae_mlops.tracking.evals import finish_run, log_eval_results, start_eval_run

        owned = False
        run_id = ropts.run_id
        if run_id is None:
            run_id, owned = start_eval_run("probe", f"probe · {sae_name(target.sae, target.sae_id)}", _eval_tags(loaded.sae),
                                           ropts.experiment, ropts.run_name)
        try:
            log_eval_results(run_id, result.metrics, files, out, ["probe"], _eval_params(loaded, popts))
        except BaseException:
            if owned:
                finish_run(run_id, "FAILED")
            raise
        if owned:
            finish_run(run_id)
    return EvalOutcome(out, result.metrics, files, result.seconds, result.messages, run_id,
                       cache_hits=result.cache.hits, cache_misses=result.cache.misses)


def run_evals_and_log(cfg: AnalysisConfig, eopts, popts, aopts, iopts, ropts) -> EvalOutcome:
    """`sae-mlops evals --suite ...`: the asked evals on one SAE, logged to one run.

    ``core`` is the quick analysis (the full analysis when ``autointerp`` is asked, which needs its
    activation database); its run is the run every other eval logs into. Without core or autointerp
    the evals log into ``--run-id`` or a new ``evals`` run linked to the SAE's analysis run."""
    from sae_mlops.config import EvalTarget
    from sae_mlops.errors import InputError
    from sae_mlops.evals.run import EvalsResult, load_target, run_absorption, run_probe, write_report
    from sae_mlops.naming import sae_name

    suite = eopts.names()
    track = not ropts.no_track
    needs_analysis = "core" in suite or "autointerp" in suite
    if ropts.run_id and needs_analysis:
        raise InputError("--run-id names a run to log into, but core and autointerp make their own analysis run; "
                         "drop --run-id or run only probe and absorption.")
    out = Path(ropts.out) if ropts.out else default_out_dir(cfg, "evals")
    preflight(out, track, no_track_option=True)
    import sae_mlops.tracking.resolve  # noqa: F401 (registers the resolver of runs:/ and models:/ SAE URIs)

    result = EvalsResult()
    analysis: QuickOutcome | None = None
    if needs_analysis:
        t0 = time.perf_counter()
        kind = "full" if "autointerp" in suite else "quick"
        runner = run_full_and_log if kind == "full" else run_quick_and_log
        analysis = runner(cfg, out / "analysis", track=track, experiment=ropts.experiment, run_name=ropts.run_name)
        result.seconds["core"] = time.perf_counter() - t0
    target = EvalTarget(**{f: getattr(cfg, f) for f in ("sae", "sae_id", "model", "hook", "context_size", "prepend_bos",
                                                        "topk_mode", "threshold", "batch_size", "device", "dtype")})
    loaded = None
    if "probe" in suite or "absorption" in suite:
        loaded = load_target(target)
    out.mkdir(parents=True, exist_ok=True)
    if "probe" in suite:
        assert loaded is not None
        run_probe(loaded, popts, out, result)
        result.metrics["time/eval_probe"] = result.seconds["probe"]
    if "absorption" in suite:
        assert loaded is not None
        run_absorption(loaded, aopts, out, result)
        result.metrics["time/eval_absorption"] = result.seconds["absorption"]
    if "autointerp" in suite:
        assert analysis is not None
        from sae_mlops.evals.autointerp import autointerp_metrics
        from sae_mlops.features.label import LabelOptions, label_features, read_done

        t0 = time.perf_counter()
        lopts = LabelOptions(model=iopts.llm_model, base_url=iopts.llm_base_url, api_key_env=iopts.llm_api_key_env,
                             concurrency=iopts.llm_concurrency, rpm=iopts.llm_rpm, n_activating=iopts.detection_activating,
                             n_non=iopts.detection_non_activating, non_activating_quantile=iopts.non_activating_quantile)
        labelled = label_features(analysis.out_dir, lopts, top=iopts.autointerp_features)
        result.metrics.update(autointerp_metrics(read_done(labelled.labels_file)))
        result.metrics.update(labelled.metrics)
        result.files += labelled.files
        n = result.metrics.get("autointerp/features_scored", 0)
        result.messages["autointerp"] = (f"{int(n)} of {int(result.metrics.get('autointerp/features_labelled', 0))} labelled features "
                                         f"scored ({int(result.metrics.get('autointerp/features_not_scored', 0))} had too few "
                                         "activating or non-activating snippets)")
        result.seconds["autointerp"] = time.perf_counter() - t0
        result.metrics["time/eval_autointerp"] = result.seconds["autointerp"]
    files = result.files + write_report(result, out, cfg.sae)
    run_id = analysis.run_id if analysis is not None else ropts.run_id
    if track:
        from sae_mlops.tracking.evals import finish_run, log_eval_results, start_eval_run

        owned = False
        if run_id is None:
            assert loaded is not None
            run_id, owned = start_eval_run("evals", f"evals · {sae_name(cfg.sae, cfg.sae_id)}", _eval_tags(loaded.sae),
                                           ropts.experiment, ropts.run_name)
        params = _eval_params(loaded, popts if "probe" in suite else None) if loaded is not None else {}
        try:
            log_eval_results(run_id, result.metrics, [f for f in files if Path(f).is_relative_to(out)], out, suite, params)
        except BaseException:
            if owned:
                finish_run(run_id, "FAILED")
            raise
        if owned:
            finish_run(run_id)
    return EvalOutcome(out, result.metrics, files, result.seconds, result.messages, run_id, analysis,
                       result.cache.hits, result.cache.misses)
