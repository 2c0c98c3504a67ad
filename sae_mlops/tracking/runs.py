"""Logging analysis results to MLflow: the only module that writes runs.

`log_analysis` puts one `AnalysisResult` (and the files the writers produced) into an MLflow run:

- run: the run named by ``MLFLOW_RUN_ID`` when set (``mlflow run`` sets it for its entry point),
  else the in-process active run if there is one, else a new run in ``experiment`` (default: the
  ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID`` environment variables, else ``sae-mlops``),
  in the store named by ``MLFLOW_TRACKING_URI`` or MLflow's default (``sqlite:///mlflow.db`` in the
  working directory for MLflow 3.x). A run this module creates is ended (FINISHED, FAILED if
  logging fails, KILLED on Ctrl-C); a run it was handed is left to its owner.
- name: ``--run-name``, else `sae_mlops.naming.run_title` (``quick · topk_512 · topk d512 k16``); the
  run's start time is when the analysis started (``start_time``), so its duration is the analysis's.
- experiment: one this module creates (or finds without a description) gets the description
  :data:`EXPERIMENT_NOTE` (tag ``mlflow.note.content``): which metrics matter, which scatter to add.
- params: ``result.params`` without the absent (None) values, stringified (containers as JSON),
  values cut to MLflow's length limit, logged in batches. When the run already holds a param of the same name with a
  different value (``mlflow run`` logs its ``-P`` values first, shell-quoted, so "not given" is
  ``''``), ours is logged as ``resolved.<name>`` and the names are listed in the tag
  ``sae_mlops.param_conflicts``; ``''`` resolved to None is not a conflict.
- metrics: ``result.metrics`` exactly as named (see `sae_mlops.core.results`); None, NaN and inf are not
  logged (MLflow cannot hold them) and their names go in the tag ``sae_mlops.unlogged_metrics``
  (the results JSON holds them as null).
- tags: ``result.tags`` (lineage from `sae_mlops.tracking.resolve`: ``sae_mlops.source_uri``,
  ``sae_mlops.source_run_id``, ``sae_mlops.source_model_name``, ``sae_mlops.source_model_version``,
  ``sae_mlops.source_model_alias``), ``sae_mlops.kind``, ``sae_mlops.sae_hash``,
  ``sae_mlops.version``. The run description (``mlflow.note.content``) starts with a one-line
  headline (L0, loss recovered, explained variance, dead fraction), then links to the source run,
  logged model and registered version (alias in code formatting, never an @mention);
  ``mlflow.parentRunId`` is never set (the source run is not a parent).
- artifacts: every file in ``files``, at its path relative to ``out_dir``; PNG plots are also logged
  as images (``log_image`` with key = the plot's name) so the chart view's image grid and the
  compare view show them side by side across runs.
- lineage (`sae_mlops.tracking.lineage`): the source training/import run, logged model and registered
  version (from the URI, or found by the SAE's content hash for a local directory), the corpus as an
  ``mlflow.data`` input (context ``analysis``), the logged model as a model input (metrics are
  linked to it and to the dataset), the code version; the model version and logged model get the
  tag ``sae_mlops.latest_analysis_run_id``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
)

from sae_mlops import __version__
from sae_mlops.metrics import headline_line
from sae_mlops.naming import run_title
from sae_mlops.core.results import AnalysisResult

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "sae-mlops"

TAG_KIND = "sae_mlops.kind"
TAG_SAE_HASH = "sae_mlops.sae_hash"
TAG_VERSION = "sae_mlops.version"
TAG_SOURCE_RUN = "sae_mlops.source_run_id"
TAG_SOURCE_MODEL_NAME = "sae_mlops.source_model_name"
TAG_SOURCE_MODEL_VERSION = "sae_mlops.source_model_version"
TAG_SOURCE_MODEL_ALIAS = "sae_mlops.source_model_alias"
TAG_UNLOGGED_METRICS = "sae_mlops.unlogged_metrics"
TAG_PARAM_CONFLICTS = "sae_mlops.param_conflicts"
TAG_NOTE = "mlflow.note.content"
TAG_FINISHED_AT = "sae_mlops.finished_at"  # UTC time the analysis finished (file names carry none)

ML_WORKFLOW = "workflowType=machine_learning"  # MLflow 3 UI: open experiments in the ML (not GenAI) view
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default

EXPERIMENT_NOTE = """SAE analyses logged by sae-mlops.

**Metrics that matter** (per analysed token; definitions in the sae-mlops documentation, docs/guides/quick.md):
`sparsity/l0_mean` (active features per token, lower is sparser), `downstream/loss_recovered`
(1 = as good as the clean model, 0 = as bad as zero-ablation), `recon/explained_variance`,
`features/dead_fraction` (never fired on the corpus), `downstream/kl_sae`.

**Chart to add**: in the Chart view, a *scatter* with x = `sparsity/l0_mean` and
y = `downstream/loss_recovered` (a second with y = `recon/explained_variance`): the sparsity /
fidelity trade-off. The plots of each run (`plots/`) can be compared as an image grid.

Run names read `<kind> · <SAE name> · <architecture> d<d_sae> k<k>`; `sae-mlops compare` writes the
Pareto table and plots as a comparison run.
"""


_TRUNCATED = "...[truncated]"
_RANDOM_NAME = re.compile(r"[a-z]+-[a-z]+-\d{1,4}")  # MLflow's generated run names: overjoyed-slug-911

# Where the SAE's content hash may appear when the analysis did not put it in the tags.
_HASH_KEYS = ("sae_hash", "sae.content_hash", "sae_content_hash", "sae.hash", "content_hash")


def log_analysis(
    result: AnalysisResult,
    files: list[Path],
    out_dir: Path,
    experiment: str | None = None,
    run_name: str | None = None,
    start_time: int | None = None,
    run_id: str | None = None,
) -> str:
    """Log `result` and `files` (artifacts, relative to `out_dir`) to MLflow; return the run id.

    run_name: None -> `analysis_run_name(result)`. start_time: when the analysis started (ms since
    the epoch), the start of a run created here (default: now). run_id: the run `start_analysis_run`
    created when the pass started (it is finished here); None resolves or creates one now."""
    client = MlflowClient()
    if run_id is not None:
        owned = True
    else:
        run_id, owned = resolve_run(client, experiment, run_name, start_time=start_time, default_name=analysis_run_name(result))
    try:
        _log_into(client, run_id, result, [Path(f) for f in files], Path(out_dir))
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if interrupted:
            e.mlflow_run_id = run_id  # type: ignore[attr-defined]  # the caller reports it
        if owned:
            client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
        raise
    bad = nonfinite_headlines(result.metrics)
    if bad:
        # a run with NaN headline metrics must not enter comparisons as a normal result
        client.set_tag(run_id, TAG_NONFINITE, ",".join(bad))
        log.warning("headline metric(s) %s are not finite; run %s is marked %s", ", ".join(bad), run_id,
                    "FAILED" if owned else f"with the tag {TAG_NONFINITE}")
    if owned:
        client.set_terminated(run_id, "FAILED" if bad else "FINISHED")
    log.info("Logged %s analysis to MLflow run %s (%s)", result.kind, run_id, mlflow.get_tracking_uri())
    return run_id


TAG_NONFINITE = "sae_mlops.nonfinite_metrics"


def nonfinite_headlines(metrics: dict[str, Any]) -> list[str]:
    """The metrics of `SAE_OUTPUT_HEADLINES` present in `metrics` whose value is NaN or infinite. Only
    headline metrics computed from the SAE's own outputs, which are finite for any finite SAE (a ratio
    such as loss recovered or a KL may be undefined on a degenerate corpus and is left alone)."""
    out = []
    for name in SAE_OUTPUT_HEADLINES:
        v = metrics.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(float(v)):
            out.append(name)
    return out


#: headline metrics computed from the SAE's codes and reconstructions (`nonfinite_headlines`)
SAE_OUTPUT_HEADLINES = ("sparsity/l0_mean", "recon/mse_per_token", "recon/explained_variance", "downstream/ce_sae")


RUNNING_NOTE = "**running** · "  # the description of a run whose pass is running (replaced at the end)


def start_analysis_run(
    previous: str | None,
    name: str,
    tags: dict[str, str],
    experiment: str | None = None,
    run_name: str | None = None,
    start_time: int | None = None,
    note: str | None = None,
) -> tuple[str, bool]:
    """The run of an analysis whose pass is starting, status RUNNING: the run of ``MLFLOW_RUN_ID``
    when set (``mlflow run``, the service: the caller owns the run), else the run ``previous`` (the
    interrupted run of a resumed analysis) when it still exists, else a new run named ``run_name``
    (else ``name``). ``note``: the run's description while it runs (prefixed with `RUNNING_NOTE`;
    the finished analysis replaces it). Returns (run id, whether this program finishes it)."""
    client = MlflowClient()
    tags = dict(tags)
    if note:
        tags[TAG_NOTE] = RUNNING_NOTE + note
    if previous and not os.environ.get("MLFLOW_RUN_ID"):
        try:
            run = client.get_run(previous)
        except MlflowException:
            log.warning("the interrupted analysis's MLflow run %s is gone; starting a new run", previous)
        else:
            if run.info.status != "RUNNING":
                client.update_run(previous, status="RUNNING")
            client.log_batch(previous, tags=[RunTag(k, v) for k, v in {**tags, "sae_mlops.resumed": "true"}.items()])
            return previous, True
    run_id, owned = resolve_run(client, experiment, run_name, start_time=start_time, default_name=name)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return run_id, owned


def log_progress(run_id: str, tokens_done: int, tokens_total: int) -> None:
    """``progress/tokens_done`` (step: tokens done, so the chart is a line) and ``progress/fraction``
    of a running analysis."""
    now = get_current_time_millis()
    frac = tokens_done / tokens_total if tokens_total else 0.0
    MlflowClient().log_batch(run_id, metrics=[Metric("progress/tokens_done", float(tokens_done), now, tokens_done),
                                              Metric("progress/fraction", frac, now, tokens_done)])


def end_run(run_id: str, status: str) -> None:
    """Set a run's final status (FAILED, KILLED, FINISHED) if it is still RUNNING; never raises."""
    try:
        from sae_mlops.tracking.preflight import check_tracking_store

        check_tracking_store(timeout_s=2.0)  # MLflow's client would retry a dead server for minutes
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - runs while an error is being reported
        log.debug("could not mark run %s %s: %s", run_id, status, e)


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """Add a few metrics to a run already logged (finished runs accept them): the pipeline's cost
    figures measured after `log_analysis` (``time/logging``, ``time/total``, ``time/pass_share``)."""
    now = get_current_time_millis()
    kept, _ = split_timings({k: float(v) for k, v in metrics.items() if v is not None})
    batch = [Metric(k, v, now, 0) for k, v in kept.items() if math.isfinite(v)]
    MlflowClient().log_batch(run_id, metrics=batch)


def analysis_run_name(result: AnalysisResult) -> str:
    """``<kind> · <sae name> · <architecture> d<d_sae> k<k>`` (`sae_mlops.naming.run_title`)."""
    p = result.params
    return run_title(result.kind, p.get("sae_name") or result.details.get("sae_name"), p.get("sae_architecture"), p.get("d_sae"), p.get("topk_k"))


def ui_base() -> tuple[str, bool]:
    """(base URL of the MLflow UI, served): the tracking server when the store is one, else where
    ``mlflow ui --backend-store-uri <store>`` serves by default (``served`` False)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/"), True
    return DEFAULT_UI, False


def run_links(run_id: str) -> dict[str, str]:
    """Links that open in the UI's ML workflow: ``run`` (the run's page), ``runs`` (the experiment's
    runs list) and ``charts`` (its chart view, where the L0 / loss-recovered scatter goes)."""
    run = MlflowClient().get_run(run_id)
    base, _ = ui_base()
    exp = f"{base}/#/experiments/{run.info.experiment_id}"
    return {
        "run": f"{exp}/runs/{run_id}?{ML_WORKFLOW}",
        "runs": f"{exp}/runs?{ML_WORKFLOW}",
        "charts": f"{exp}/runs?{ML_WORKFLOW}&compareRunsMode=CHART",
    }


def run_url(run_id: str) -> str:
    """The run's page in the UI (`run_links`), with the store named when it is not a server."""
    base, served = ui_base()
    url = run_links(run_id)["run"]
    return url if served else f"{url} (after `mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}`)"


# --- run resolution -------------------------------------------------------------------------


def resolve_run(
    client: MlflowClient,
    experiment: str | None,
    run_name: str | None,
    start_time: int | None = None,
    default_name: str | None = None,
) -> tuple[str, bool]:
    """Return (run_id, created_here). A run created here is named `run_name`, else `default_name`; the
    run of ``MLFLOW_RUN_ID`` is renamed to `run_name`, or to `default_name` when its name is one MLflow
    generated (``adjective-noun-123``; ``mlflow run --run-name`` names are kept)."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        try:
            run = client.get_run(env_run)
        except MlflowException as e:
            raise MlflowException(f"MLFLOW_RUN_ID={env_run} names no run in {mlflow.get_tracking_uri()}: {e}") from e
        if run.info.status != "RUNNING":
            client.update_run(env_run, status="RUNNING")
        name = run_name or (default_name if _RANDOM_NAME.fullmatch(run.info.run_name or "x-y-0") else None)
        if name:
            client.update_run(env_run, name=name)
        log.debug("Logging into the run from MLFLOW_RUN_ID: %s", env_run)
        return env_run, False
    active = mlflow.active_run()
    if active is not None:
        log.debug("Logging into the active run %s", active.info.run_id)
        return active.info.run_id, False

    experiment_id = _experiment_id(client, experiment)
    from mlflow.tracking.context import registry as context_registry

    tags = context_registry.resolve_tags({})  # user, source name/type, git commit
    run = client.create_run(experiment_id=experiment_id, run_name=run_name or default_name, tags=tags, start_time=start_time)
    log.debug("Created run %s in experiment %s", run.info.run_id, experiment_id)
    return run.info.run_id, True


def _experiment_id(client: MlflowClient, experiment: str | None) -> str:
    if experiment is None:
        env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if env_id:
            return env_id
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if not found.tags.get(TAG_NOTE):
            client.set_experiment_tag(found.experiment_id, TAG_NOTE, EXPERIMENT_NOTE)
        return found.experiment_id
    try:
        return client.create_experiment(experiment, tags={TAG_NOTE: EXPERIMENT_NOTE})
    except MlflowException:
        # Created concurrently by another process.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


# --- what gets logged --------------------------------------------------------------------------


def _log_into(client: MlflowClient, run_id: str, result: AnalysisResult, files: list[Path], out_dir: Path) -> None:
    existing = client.get_run(run_id)

    params, conflicts = flat_params(result.params, existing.data.params)
    client.log_batch(run_id, params=params)  # log_batch splits into MLflow\'s batch limits itself

    link = _record_lineage(client, run_id, result)
    run_metrics, timing_detail = split_timings(result.metrics)
    metrics, unlogged = _metrics(run_metrics)
    if link is not None and (link.model_id or link.dataset_digest):
        # Linked to the LoggedModel and the dataset, so they show on the model's page too.
        metrics = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=link.model_id,
                   dataset_name=link.dataset_name, dataset_digest=link.dataset_digest)
            for m in metrics
        ]
    client.log_batch(run_id, metrics=metrics)  # log_batch splits into MLflow\'s batch limits itself

    tags = {str(k): str(v) for k, v in result.tags.items()}
    if link is not None:
        tags.update(link.tags)
    tags[TAG_KIND] = result.kind
    tags[TAG_VERSION] = __version__
    if result.details.get("finished_at"):
        tags[TAG_FINISHED_AT] = str(result.details["finished_at"])
    sae_hash = _sae_hash(result)
    if sae_hash:
        tags[TAG_SAE_HASH] = sae_hash
    if unlogged:
        tags[TAG_UNLOGGED_METRICS] = ",".join(unlogged)
    if conflicts:
        tags[TAG_PARAM_CONFLICTS] = ",".join(conflicts)
    note = run_note(client, result, tags, link, existing.data.tags.get(TAG_NOTE))
    if note is not None:
        tags[TAG_NOTE] = note
    tag_list = [RunTag(metric_key(k), _cut(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
    client.log_batch(run_id, tags=tag_list)  # log_batch splits into MLflow\'s batch limits itself

    _log_files(client, run_id, files, out_dir)
    if timing_detail:
        client.log_dict(run_id, timing_detail, TIMINGS_ARTIFACT)
    _log_plot_images(client, run_id, files)
    if link is not None:
        from sae_mlops.tracking.lineage import after_analysis_logged

        after_analysis_logged(client, run_id, link, headline(result.metrics))


def _record_lineage(client: MlflowClient, run_id: str, result: AnalysisResult):
    """Lineage (source run, logged model, registered version, dataset input, code version; see
    `sae_mlops.tracking.lineage`). A failure here is logged and tagged, never fatal: the analysis
    itself is still recorded."""
    from sae_mlops.tracking.lineage import TAG_LINEAGE_ERROR, record_analysis_lineage

    try:
        return record_analysis_lineage(client, run_id, result)
    except MlflowException as e:
        log.warning("Could not record the lineage of run %s: %s", run_id, e.message)
        client.set_tag(run_id, TAG_LINEAGE_ERROR, _cut(str(e.message), MAX_TAG_VAL_LENGTH))
        return None


def flat_params(given: dict[str, Any], existing: dict[str, str]) -> tuple[list[Param], list[str]]:
    out: list[Param] = []
    conflicts: list[str] = []
    for k, v in given.items():
        key = metric_key(str(k))
        if v is None:  # absent: left out (a "None" string would compare as a value)
            continue
        value = _cut(_stringify(v), MAX_PARAM_VAL_LENGTH)
        if key in existing:
            if existing[key] == value:
                continue
            conflicts.append(key)
            key = metric_key(f"resolved.{key}")
            if existing.get(key) == value:
                continue
        out.append(Param(key, value))
    return out, conflicts


TIMINGS_ARTIFACT = "timings.json"
#: cost figures kept out of the run's metrics (they would bury the ones a researcher compares): the
#: parts of the pass and every CPU-seconds figure go to `TIMINGS_ARTIFACT` (and the results JSON)
_TIMING_DETAIL = ("time_cpu/", "time/pass/")


def split_timings(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the metrics logged as run metrics, the timing detail logged as `TIMINGS_ARTIFACT`).

    The run keeps ``time/<stage>`` (wall seconds per stage, rounded to milliseconds) and every other
    metric as it is; ``time_cpu/*`` and the parts of the pass (``time/pass/<part>``) go to the file,
    at full precision."""
    run: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.startswith(_TIMING_DETAIL):
            detail[key] = value
        elif key.startswith("time/") and isinstance(value, float) and math.isfinite(value) and key != "time/pass_share":
            run[key] = round(value, 3)
        else:
            run[key] = value
    return run, detail


def _metrics(given: dict[str, Any]) -> tuple[list[Metric], list[str]]:
    now = get_current_time_millis()
    out: list[Metric] = []
    unlogged: list[str] = []
    for k, v in given.items():
        value = None
        if v is not None and not isinstance(v, bool):
            try:
                value = float(v)
            except (TypeError, ValueError):
                value = None
        if value is None or not math.isfinite(value):
            unlogged.append(str(k))
            continue
        out.append(Metric(metric_key(str(k)), value, now, 0))
    return out, unlogged


def _sae_hash(result: AnalysisResult) -> str | None:
    if result.tags.get(TAG_SAE_HASH):
        return str(result.tags[TAG_SAE_HASH])
    for k in _HASH_KEYS:
        if result.params.get(k):
            return str(result.params[k])
    for k, v in result.params.items():
        if v and (str(k).endswith("content_hash") or str(k).endswith("sae_hash")):
            return str(v)
    return None


def headline(metrics: dict[str, Any]) -> str:
    """One line: ``L0 **12.34** · loss recovered **0.9512** · ...`` (`sae_mlops.metrics.headline_line`)."""
    return headline_line(metrics, bold=True)


def run_note(client: MlflowClient, result: AnalysisResult, tags: dict[str, str], link: Any, current: str | None) -> str | None:
    """The run description: the headline line, then the lineage links, then any description the run
    already had (`mlflow run`, a user) that is not ours. None when there is nothing to say."""
    lines = [f"**{result.kind} analysis** · " + headline(result.metrics)] if headline(result.metrics) else []
    lineage = lineage_lines(client, tags, getattr(link, "model_id", None) if link is not None else tags.get("sae_mlops.source_logged_model_id"))
    lines += lineage
    if not lines:
        return None
    note = "\n\n".join(lines)
    if current and current.strip() and not current.startswith((lines[0], RUNNING_NOTE)):
        note += "\n\n" + current.strip()
    return note


def lineage_lines(client: MlflowClient, tags: dict[str, str], model_id: str | None) -> list[str]:
    """Markdown lines linking the source run, the logged model and the registered version; the alias
    is in code formatting (plain ``@alias`` would render as a mention link)."""
    src_run = tags.get(TAG_SOURCE_RUN)
    name, version = tags.get(TAG_SOURCE_MODEL_NAME), tags.get(TAG_SOURCE_MODEL_VERSION)
    alias = tags.get(TAG_SOURCE_MODEL_ALIAS)
    out = []
    if src_run:
        try:
            run = client.get_run(src_run)
            title = run.info.run_name or src_run
            out.append(f"SAE trained/imported in run [{_md_text(title)}](#/experiments/{run.info.experiment_id}/runs/{src_run}).")
        except MlflowException:
            out.append(f"SAE from run `{src_run}` (not in this tracking store).")
    if model_id:
        try:
            model = client.get_logged_model(model_id)
            out.append(f"Logged model [{_md_text(model.name)}](#/experiments/{model.experiment_id}/models/{model_id}) (`{model_id}`).")
        except MlflowException:
            out.append(f"Logged model `{model_id}`.")
    if name:
        where = f"[{_md_text(name)} v{version}](#/models/{name}/versions/{version})" if version else f"`{name}`"
        out.append(f"Registered model {where}" + (f", alias `@{alias}`" if alias else "") + ".")
    return out


def _md_text(s: str) -> str:
    """Link text with the characters markdown would interpret escaped."""
    return "".join("\\" + c if c in "[]()*_`|@<>" else c for c in str(s))


def _log_files(client: MlflowClient, run_id: str, files: list[Path], out_dir: Path) -> None:
    out_dir = out_dir.resolve()
    by_dir: dict[str | None, list[Path]] = defaultdict(list)
    for f in files:
        f = f.resolve()
        if not f.is_file():
            log.warning("Not logging %s as an artifact: not a file", f)
            continue
        try:
            rel_parent = f.relative_to(out_dir).parent.as_posix()
        except ValueError:
            log.warning("%s is outside %s; logging it at the artifact root", f, out_dir)
            rel_parent = "."
        by_dir[None if rel_parent in (".", "") else rel_parent].append(f)
    for artifact_path, paths in by_dir.items():
        for p in paths:
            client.log_artifact(run_id, str(p), artifact_path=artifact_path)


def _log_plot_images(client: MlflowClient, run_id: str, files: list[Path]) -> None:
    """PNG plots also as MLflow images (key = file stem, step 0): the chart view's image grid and the
    run comparison show the same plot of several runs side by side."""
    pngs = [Path(f) for f in files if Path(f).suffix.lower() == ".png" and Path(f).is_file()]
    if not pngs:
        return
    from PIL import Image

    for f in pngs:
        try:
            with Image.open(f) as img:
                client.log_image(run_id, img.convert("RGB"), key=f.stem, step=0)
        except (OSError, ValueError, MlflowException) as exc:
            log.warning("could not log %s as an image: %s", f, exc)


# --- helpers -------------------------------------------------------------------------------------


def _stringify(v: Any) -> str:
    if v is None or isinstance(v, (str, bool, int, float)):
        return str(v)
    if isinstance(v, Path):
        return v.as_posix()
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(v)


def _cut(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - len(_TRUNCATED)] + _TRUNCATED


def metric_key(k: str) -> str:
    return k[:MAX_ENTITY_KEY_LENGTH]
