"""Compare analyses tracked in MLflow: one table, two Pareto plots, logged as a comparison run.

:func:`collect_analyses` searches quick/full analysis runs (``sae_mlops.kind``) in the named
experiments (default: every active experiment) that match an optional MLflow filter string (e.g.
``"metrics.`sparsity/l0_mean` < 50"`` or ``"params.sae_architecture = 'topk'"``) and builds one
row per run from the metric names of `sae_mlops.core.results` (``sparsity/l0_mean``,
``downstream/loss_recovered``, ``recon/explained_variance``, ``features/dead_fraction``,
``downstream/ce_*``, ``downstream/kl_sae``) and the params ``sae``, ``sae_name``,
``sae_architecture``, ``d_sae``, ``topk_k`` (when a run lacks it, the ``k`` of its source training
run for a TopK SAE). By default only the latest analysis per SAE content hash and kind is kept
(a quick and a full analysis of one SAE are two rows; two quick analyses of it, one); ``all_runs``
keeps every run. A run without a hash is always kept.

:func:`compare_and_log` writes the table and plots (`sae_mlops.outputs.comparison`) under `out_dir`
and logs them as artifacts of a new run tagged ``sae_mlops.kind=compare`` (or of the run named by
``MLFLOW_RUN_ID`` under ``mlflow run . -e compare``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sae_mlops.errors import InputError
from sae_mlops.metrics import BY_SHORT
from sae_mlops.naming import sae_name
from sae_mlops.tracking.lineage import (
    ANALYSIS_KINDS,
    TAG_KIND,
    TAG_SAE_HASH,
    all_experiment_ids,
    search_runs_everywhere,
)
from sae_mlops.tracking.resolve import (
    TAG_SOURCE_MODEL_NAME,
    TAG_SOURCE_MODEL_VERSION,
    TAG_SOURCE_RUN_ID,
)


log = logging.getLogger(__name__)

#: compare's metric columns (short name -> metric name), from the metric registry.
COMPARE_COLUMNS = ("l0", "loss_recovered", "explained_variance", "dead_fraction", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "tokens")
METRICS = {short: BY_SHORT[short].name for short in COMPARE_COLUMNS}
FILTER_EXAMPLE = "metrics.`sparsity/l0_mean` < 50"


@dataclass
class CompareOutcome:
    table: pd.DataFrame
    out_dir: Path
    files: list[Path]
    run_id: str | None = None
    experiments: list[str] = field(default_factory=list)
    tracking_uri: str | None = None


def _experiment_ids(client: MlflowClient, names: list[str] | None) -> tuple[list[str], list[str]]:
    if not names:
        ids = all_experiment_ids(client)
        return ids, [client.get_experiment(i).name for i in ids]
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage == "deleted":
            known = [e.name for e in client.search_experiments()][:8]
            raise InputError(
                f"Experiment {name!r} does not exist in {mlflow.get_tracking_uri()}; check --experiment "
                f"(experiments there: {', '.join(known) or 'none'})."
            )
        ids.append(exp.experiment_id)
    return ids, list(names)


_NAME_IN = re.compile(
    r"(?i)(?:\b(?:attributes?|run)\.)?(?:`run_name`|run_name|tags\.`mlflow\.runName`|tags\.mlflow\.runName)"
    r"\s+IN\s*\(([^)]*)\)")
_QUOTED = re.compile(r"'((?:[^']|'')*)'|\"([^\"]*)\"")


def split_run_name_in(where: str) -> tuple[str, set[str] | None]:
    """MLflow's search refuses ``attributes.run_name IN ('a', 'b')``; take that clause (an AND term)
    out of `where` and return the rest and the names, which the caller matches itself (None: no such
    clause). Hand-written (one regular expression) because MLflow offers no parser for its filters."""
    m = _NAME_IN.search(where)
    if not m:
        return where, None
    names = {a.replace("''", "'") if a else b for a, b in _QUOTED.findall(m.group(1))}
    rest = (where[:m.start()] + where[m.end():]).strip()
    rest = re.sub(r"(?i)^\s*and\b|\band\s*$", "", rest).strip()
    rest = re.sub(r"(?i)\band\s+and\b", "and", rest)
    return rest, names


def collect_analyses(
    experiments: list[str] | None = None,
    filter_string: str | None = None,
    client: MlflowClient | None = None,
    all_runs: bool = False,
) -> pd.DataFrame:
    """One row per quick/full analysis run, the latest per (SAE hash, kind) unless `all_runs` (see
    the module docstring); InputError when none match."""
    client = client or MlflowClient()
    ids, names = _experiment_ids(client, experiments)
    where, run_names = split_run_name_in((filter_string or "").strip())
    try:
        runs = search_runs_everywhere(client, where, ids, order_by=["attributes.start_time ASC"]) if ids else []
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE" and where:
            message = " ".join(str(exc.message).split())
            raise InputError(
                f"--filter {where!r} is not a valid MLflow search filter ({message}); "
                f"write e.g. \"{FILTER_EXAMPLE}\"."
            ) from None
        raise
    runs = [r for r in runs if r.data.tags.get(TAG_KIND) in ANALYSIS_KINDS]
    if run_names is not None:
        runs = [r for r in runs if r.info.run_name in run_names]
        where = (filter_string or "").strip()  # for the message below
    if not runs:
        scope = ", ".join(names) if experiments else "any experiment"
        extra = f" matching {where!r}" if where else ""
        raise InputError(
            f"No quick or full analysis runs{extra} in {scope} ({mlflow.get_tracking_uri()}); "
            "run sae-mlops quick (or full) first, or check --experiment / --filter."
        )
    if not all_runs:
        runs = latest_per_sae(runs)
    exp_names = {i: client.get_experiment(i).name for i in {r.info.experiment_id for r in runs}}
    source_params: dict[str, dict[str, str]] = {}
    rows = [_row(client, r, exp_names, source_params) for r in runs]
    return pd.DataFrame(rows)


def latest_per_sae(runs: list[Run]) -> list[Run]:
    """The latest run (by start time) per (SAE content hash, kind), in start-time order; runs
    without a hash are all kept."""
    latest: dict[tuple[str, str], Run] = {}
    keep: list[Run] = []
    for run in runs:
        h = run.data.tags.get(TAG_SAE_HASH) or run.data.params.get("sae_hash")
        if not h:
            keep.append(run)
            continue
        key = (h, run.data.tags.get(TAG_KIND, ""))
        if key not in latest or (run.info.start_time or 0) >= (latest[key].info.start_time or 0):
            latest[key] = run
    keep += latest.values()
    return sorted(keep, key=lambda r: r.info.start_time or 0)


def _row(client: MlflowClient, run: Run, exp_names: dict[str, str], cache: dict[str, dict[str, str]]) -> dict[str, Any]:
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    sae = p.get("sae", "")
    name = p.get("sae_name") or (sae_name(sae) if sae else "")
    k = _num(p.get("topk_k"))
    source = t.get(TAG_SOURCE_RUN_ID)
    if k is None and source:
        if source not in cache:
            try:
                cache[source] = client.get_run(source).data.params
            except MlflowException:
                cache[source] = {}
        if (cache[source].get("architecture") or "") in ("topk", "batchtopk"):
            k = _num(cache[source].get("k"))
    model = t.get(TAG_SOURCE_MODEL_NAME)
    version = t.get(TAG_SOURCE_MODEL_VERSION)
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": exp_names.get(run.info.experiment_id, run.info.experiment_id),
        "kind": t.get(TAG_KIND),
        "sae": sae,
        "sae_name": name,
        "sae_hash": (t.get(TAG_SAE_HASH) or p.get("sae_hash") or "")[:12],
        "architecture": p.get("sae_architecture"),
        "d_sae": _num(p.get("d_sae")),
        "k": k,
        "model": f"{model} v{version}" if model and version else (model or ""),
        "source_run_id": source or "",
        "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True) if run.info.start_time else None,
    }
    for column, metric in METRICS.items():
        row[column] = m.get(metric, float("nan"))
    row["label"] = f"{row['sae_name'] or run.info.run_name} · {row['kind']}"
    return row


def _num(value: Any) -> float | None:
    if value in (None, "", "None"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def compare_and_log(
    experiments: list[str] | None = None,
    filter_string: str | None = None,
    out_dir: Path | str | None = None,
    *,
    track: bool = True,
    experiment: str | None = None,
    run_name: str | None = None,
    all_runs: bool = False,
) -> CompareOutcome:
    """Collect the analyses, write the table and the Pareto plots under `out_dir`, and log them as a
    comparison run (in `experiment`; default: the single compared experiment, else the default)."""
    from sae_mlops.naming import utc_timestamp
    from sae_mlops.tracking.lineage import code_version_tags
    from sae_mlops.outputs.comparison import add_frontiers, write_comparison

    client = MlflowClient()
    df = add_frontiers(collect_analyses(experiments, filter_string, client, all_runs=all_runs))
    out = Path(out_dir) if out_dir else Path("analysis") / "comparisons" / f"compare_{utc_timestamp()}"
    scope = ", ".join(experiments) if experiments else "all experiments"
    context = f"{len(df)} analyses from {scope}" + (f", filter `{filter_string}`" if filter_string else "")
    files = write_comparison(df, out, context=context)
    outcome = CompareOutcome(table=df, out_dir=out, files=files, experiments=list(experiments or []))
    if not track:
        return outcome
    from sae_mlops.tracking.runs import resolve_run

    target = experiment or (experiments[0] if experiments and len(experiments) == 1 else None)
    run_id, owned = resolve_run(client, target, run_name or f"compare · {len(df)} analyses")
    try:
        existing = client.get_run(run_id).data.params
        params = {"experiments": scope, "filter": filter_string or None, "n_analyses": str(len(df)), "all_runs": str(all_runs)}
        for key, value in params.items():
            if value is not None and key not in existing:
                client.log_param(run_id, key, value[:6000])
        for key, value in {TAG_KIND: "compare", **code_version_tags(),
                           "sae_mlops.compared_runs": ",".join(df["run_id"])[:5000]}.items():
            client.set_tag(run_id, key, value)
        # counts as params, not metrics: metrics of this run would crowd the experiment's chart view
        for column in ("loss_recovered", "explained_variance"):
            key = f"frontier_size_{column}"
            if key not in existing:
                client.log_param(run_id, key, str(int(df[f"pareto_{column}"].sum())))
        for f in files:
            client.log_artifact(run_id, str(f))
    except BaseException:
        if owned:
            client.set_terminated(run_id, "FAILED")
        raise
    if owned:
        client.set_terminated(run_id, "FINISHED")
    outcome.run_id = run_id
    outcome.tracking_uri = mlflow.get_tracking_uri()
    log.info("Comparison of %d analyses logged to run %s", len(df), run_id)
    return outcome
