"""Compare analyses tracked in MLflow: one table, two Pareto plots, logged as a comparison run.

:func:`collect_analyses` searches quick/full analysis runs (``sae_mlops.kind``) in the named
experiments (default: every active experiment) that match an optional MLflow filter string (e.g.
``"metrics.`sparsity/l0_mean` < 50"`` or ``"params.sae_architecture = 'topk'"``) and builds one
row per run from the metric names of `sae_mlops.core.results` (``sparsity/l0_mean``,
``downstream/loss_recovered``, ``recon/explained_variance``, ``features/dead_fraction``,
``downstream/ce_*``, ``downstream/kl_sae``) and the params ``sae``, ``sae_name``,
``sae_architecture``, ``d_sae``, ``topk_k`` (when a run lacks it, the ``k`` of its source training
run for a TopK SAE). Eval metrics (``probe/``, ``absorption/``, ``autointerp/``) come from the
analysis run or, for a group it has none of, from the newest finished ``probe``/``evals`` run of the
same SAE in the searched experiments (linked to the analysis run, or of the same SAE content hash and
hook); the column ``eval_run_ids`` names the runs used. By default only the latest analysis per SAE
content hash and kind is kept
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
from sae_mlops.metrics import BY_SHORT, CI_HIGH, CI_LOW
from sae_mlops.naming import sae_name
from sae_mlops.tracking.evals import TAG_ANALYSIS_RUN
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
    verdicts: list[Any] = field(default_factory=list)  # sae_mlops.core.verdicts.Verdict rows
    verdict_note: str = ""  # how the verdicts were reached (reference, pairing, correction, seed floors)


#: tag of a training run: the hash of its recipe (every training option but the seed), set by `train --seeds`
TAG_RECIPE_HASH = "sae_mlops.recipe_hash"
#: eval columns (sae-mlops evals / probe, logged into the analysis run or into a linked probe/evals run of the same
#: SAE, see `with_eval_metrics`): shown when an analysis has them
EVAL_COLUMNS = {"probe_acc_k1": "probe/sae_acc_k1", "probe_acc_k5": "probe/sae_acc_k5",
                "absorption": "absorption/full_absorption_rate", "autointerp": "autointerp/detection_score"}
#: kinds of the runs of evals logged apart from an analysis, and the metric groups compare takes from them
EVAL_RUN_KINDS = ("probe", "evals")
EVAL_PREFIXES = ("probe/", "absorption/", "autointerp/")
#: interval columns of the table: column -> its metric (bounds in <column>_low / <column>_high)
INTERVAL_COLUMNS = ("l0", "loss_recovered", "explained_variance", "dead_fraction")


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
    evals = eval_runs(client, ids)
    rows = [_row(client, r, exp_names, source_params, linked_eval_runs(r, evals)) for r in runs]
    return pd.DataFrame(rows)


def eval_runs(client: MlflowClient, experiment_ids: list[str]) -> list[Run]:
    """The finished runs of evals logged apart from an analysis (kinds :data:`EVAL_RUN_KINDS`:
    `sae-mlops probe`, `sae-mlops evals` without core) in these experiments, oldest first."""
    out: list[Run] = []
    for kind in EVAL_RUN_KINDS:
        out += search_runs_everywhere(client, f"tags.`{TAG_KIND}` = '{kind}' AND attributes.status = 'FINISHED'",
                                      experiment_ids) if experiment_ids else []
    return sorted(out, key=lambda r: r.info.start_time or 0)


def linked_eval_runs(run: Run, evals: list[Run]) -> list[Run]:
    """The eval runs of analysis `run`'s SAE: those whose ``sae_mlops.analysis_run_id`` names it, and
    those of the same SAE content hash at the same hook (an eval run made before the analysis has no
    link, and probing does not depend on the analysis's token plan); oldest first."""
    h = run.data.tags.get(TAG_SAE_HASH) or run.data.params.get("sae_hash")
    hook = run.data.params.get("resolved.hook") or run.data.params.get("hook")
    out = []
    for e in evals:
        if e.data.tags.get(TAG_ANALYSIS_RUN) == run.info.run_id:
            out.append(e)
        elif h and e.data.tags.get(TAG_SAE_HASH) == h and (hook is None or e.data.params.get("hook", hook) == hook):
            out.append(e)
    return out


def with_eval_metrics(metrics: dict[str, float], linked: list[Run]) -> tuple[dict[str, float], list[str]]:
    """An analysis run's metrics plus, for each eval group (``probe/``, ``absorption/``,
    ``autointerp/``) the run lacks, every metric of that group from the newest linked eval run that
    has it (one run per group, so a group's figures and intervals never mix runs); and the ids of the
    eval runs used."""
    merged = dict(metrics)
    used: list[str] = []
    for prefix in EVAL_PREFIXES:
        if any(k.startswith(prefix) for k in metrics):
            continue
        for e in reversed(linked):
            group = {k: v for k, v in e.data.metrics.items() if k.startswith(prefix)}
            if group:
                merged.update(group)
                used.append(e.info.run_id)
                break
    return merged, list(dict.fromkeys(used))


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


def _row(client: MlflowClient, run: Run, exp_names: dict[str, str], cache: dict[str, dict[str, str]],
         linked: list[Run] | None = None) -> dict[str, Any]:
    p, t = run.data.params, run.data.tags
    m, used = with_eval_metrics(run.data.metrics, linked or [])
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
        "eval_run_ids": ",".join(used),
        "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True) if run.info.start_time else None,
    }
    for column, metric in METRICS.items():
        row[column] = m.get(metric, float("nan"))
    for column, metric in EVAL_COLUMNS.items():
        if metric in m:
            row[column] = m[metric]
            row[f"{column}_low"] = m.get(metric + CI_LOW, float("nan"))
            row[f"{column}_high"] = m.get(metric + CI_HIGH, float("nan"))
    for column in INTERVAL_COLUMNS:
        row[f"{column}_low"] = m.get(METRICS[column] + CI_LOW, float("nan"))
        row[f"{column}_high"] = m.get(METRICS[column] + CI_HIGH, float("nan"))
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
    reference: str | None = None,
    verdicts: bool = True,
    alpha: float = 0.05,
    resamples: int = 9999,
    baseline: bool = False,
) -> CompareOutcome:
    """Collect the analyses, write the table and the Pareto plots under `out_dir`, and log them as a
    comparison run (in `experiment`; default: the single compared experiment, else the default).

    verdicts: also judge every analysis against ``reference`` (a run id or its first 8+ characters, a
    run name or an SAE name; default the first analysis) on the judged metrics
    (:mod:`sae_mlops.core.verdicts`: paired block bootstrap, Holm at ``alpha``, seed floors when
    several seeds of a recipe are compared), with ``resamples`` bootstrap resamples. baseline: judge
    each trained SAE's analysis against every random-baseline analysis (training runs tagged
    ``sae_mlops.baseline``, `sae-mlops train --baseline`) of the same hook instead of one reference."""
    from sae_mlops.naming import utc_timestamp
    from sae_mlops.tracking.lineage import code_version_tags
    from sae_mlops.outputs.comparison import add_frontiers, write_comparison

    client = MlflowClient()
    df = add_frontiers(collect_analyses(experiments, filter_string, client, all_runs=all_runs))
    out = Path(out_dir) if out_dir else Path("analysis") / "comparisons" / f"compare_{utc_timestamp()}"
    scope = ", ".join(experiments) if experiments else "all experiments"
    context = f"{len(df)} analyses from {scope}" + (f", filter `{filter_string}`" if filter_string else "")
    if baseline:
        rows, note = judge_against_baselines(client, df, alpha=alpha, resamples=resamples)
    else:
        rows, note = judge_analyses(client, df, reference, alpha=alpha, resamples=resamples) if verdicts else ([], "")
    files = write_comparison(df, out, context=context, verdicts=rows, verdict_note=note)
    outcome = CompareOutcome(table=df, out_dir=out, files=files, experiments=list(experiments or []), verdicts=rows,
                             verdict_note=note)
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
        if rows:
            if "reference" not in existing:
                client.log_param(run_id, "reference", ", ".join(sorted({r.reference for r in rows}))[:500])
            client.log_batch(run_id, metrics=_difference_metrics(rows))
            client.set_tag(run_id, "mlflow.note.content", _compare_note(rows, note))
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


# ---- verdicts ---------------------------------------------------------------------------------------


def find_reference(df: pd.DataFrame, reference: str | None) -> int:
    """Row position of the reference analysis: ``reference`` matched against run ids (a prefix of 8
    or more characters), run names, SAE names and labels; the first row when None. InputError naming
    the candidates when nothing (or more than one analysis) matches."""
    if reference is None:
        return 0
    ref = reference.strip()
    hits = [i for i, (_, r) in enumerate(df.iterrows())
            if (len(ref) >= 8 and str(r["run_id"]).startswith(ref)) or ref in (r.get("run_name"), r.get("sae_name"), r.get("label"))]
    if len(hits) != 1:
        names = ", ".join(f"{r['run_name']} ({str(r['run_id'])[:8]})" for _, r in df.head(8).iterrows())
        what = "matches no compared analysis" if not hits else f"matches {len(hits)} analyses"
        raise InputError(f"--reference {reference!r} {what}; give a run id, run name or SAE name of one of: {names}.")
    return hits[0]


def _recipe_hash(client: MlflowClient, source_run_id: str, cache: dict[str, str | None]) -> str | None:
    if not source_run_id:
        return None
    if source_run_id not in cache:
        try:
            cache[source_run_id] = client.get_run(source_run_id).data.tags.get(TAG_RECIPE_HASH)
        except MlflowException:
            cache[source_run_id] = None
    return cache[source_run_id]


def judge_analyses(client: MlflowClient, df: pd.DataFrame, reference: str | None, alpha: float = 0.05,
                   resamples: int = 9999) -> tuple[list[Any], str]:
    """Verdicts of every compared analysis against the reference (see `compare_and_log`), and a note
    saying how they were reached. Analyses without per-block statistics are named in the note."""
    from sae_mlops.core.intervals import same_plan
    from sae_mlops.core.verdicts import interval_rows, judge, judged_metrics, seed_floors
    from sae_mlops.tracking.artifacts import load_block_sums

    ref_pos = find_reference(df, reference)
    sums: dict[int, Any] = {}
    missing: list[str] = []
    for i, (_, row) in enumerate(df.iterrows()):
        try:
            got = load_block_sums(str(row["run_id"]), client)
        except (MlflowException, ValueError, OSError) as e:
            log.warning("no per-block statistics for run %s: %s", row["run_id"], e)
            got = None
        if got is None:
            missing.append(str(row["label"]))
        else:
            sums[i] = got
    labels = [str(v) for v in df["label"]]
    if ref_pos not in sums:
        return [], (f"No verdicts: the reference {labels[ref_pos]} has no per-block statistics (analysed before "
                    "intervals existed); re-run its analysis or pick another --reference.")
    metrics = judged_metrics()
    cache: dict[str, str | None] = {}
    groups: dict[str, list[dict[str, float]]] = {}
    runs = [client.get_run(str(r["run_id"])) for _, r in df.iterrows()]
    for i, (_, row) in enumerate(df.iterrows()):
        # analyses copy the recipe hash from their training run; older ones are looked up there
        recipe = runs[i].data.tags.get(TAG_RECIPE_HASH) or _recipe_hash(client, str(row.get("source_run_id") or ""), cache)
        if recipe and i in sums:
            groups.setdefault(recipe, []).append(sums[i].point())
    floors = seed_floors(groups, metrics)
    variants = [(labels[i], sums[i]) for i in sorted(sums) if i != ref_pos]
    run_metrics = [_merged_metrics(client, run, str(row.get("eval_run_ids") or ""))
                   for run, (_, row) in zip(runs, df.iterrows(), strict=True)]
    evals = interval_rows((labels[ref_pos], run_metrics[ref_pos]),
                          [(labels[i], run_metrics[i]) for i in sorted(sums) if i != ref_pos])
    rows = judge((labels[ref_pos], sums[ref_pos]), variants, metrics, alpha=alpha, resamples=resamples, floors=floors,
                 extra=evals)
    paired = [label for label, s in variants if same_plan(s, sums[ref_pos])]
    unpaired = [label for label, s in variants if not same_plan(s, sums[ref_pos])]
    n_seeds = sum(len(g) for g in groups.values() if len(g) >= 2)
    parts = [f"Reference: {labels[ref_pos]}.",
             f"Differences are variant - reference with 95 % block-bootstrap intervals ({resamples} resamples); "
             f"paired block by block for {len(paired)} variant(s) on the reference's token plan"
             + (f", unpaired (independent resamples; wider) for {len(unpaired)}: {', '.join(unpaired)}" if unpaired else "")
             + ".",
             f"Verdicts: Holm-adjusted bootstrap p < {alpha} over {len(rows)} tests (metrics x variants), direction "
             "from the metric registry; 'within noise' otherwise."]
    if evals:
        parts.append(f"{len(evals)} eval row(s) (probing, absorption, auto-interp) are judged from their own logged 95 % "
                     "intervals, unpaired, by a normal approximation (see the evals guide).")
    parts.append(f"Seed noise floors from {n_seeds} seed analyses of {sum(1 for g in groups.values() if len(g) >= 2)} "
                 "recipe(s) apply: a verdict also needs |difference| > floor." if floors else
                 "No seed noise floor (fewer than two seeds of any compared recipe): the verdicts cover token-sample "
                 "noise only; train with `sae-mlops train --seeds N` to measure the seed's.")
    if missing:
        parts.append(f"Not judged (no per-block statistics; analysed before intervals existed): {', '.join(missing)}.")
    return rows, " ".join(parts)


def _merged_metrics(client: MlflowClient, run: Run, eval_run_ids: str) -> dict[str, float]:
    """`run`'s metrics with the eval metrics of the eval runs the table took them from (`with_eval_metrics`)."""
    linked = [client.get_run(i) for i in eval_run_ids.split(",") if i]
    return with_eval_metrics(run.data.metrics, linked)[0]


def judge_against_baselines(client: MlflowClient, df: pd.DataFrame, alpha: float = 0.05,
                            resamples: int = 9999) -> tuple[list[Any], str]:
    """``compare --baseline``: every analysis of a trained SAE against every analysis of a random
    baseline (its training run tagged ``sae_mlops.baseline``: frozen decoder, soft-frozen decoder or
    frozen encoder, arXiv 2602.14111) at the same hook, all rows in one Holm family. Does the SAE
    beat random directions, and on what?"""
    from sae_mlops.core.verdicts import judge_pairs
    from sae_mlops.tracking.artifacts import load_block_sums
    from sae_mlops.tracking.training import TAG_BASELINE

    cache: dict[str, dict[str, str]] = {}

    def source_tags(run_id: str) -> dict[str, str]:
        if run_id and run_id not in cache:
            try:
                cache[run_id] = dict(client.get_run(run_id).data.tags)
            except MlflowException:
                cache[run_id] = {}
        return cache.get(run_id, {})

    trained: list[tuple[str, Any, Any]] = []
    baselines: list[tuple[str, Any, Any]] = []
    for _, row in df.iterrows():
        run = client.get_run(str(row["run_id"]))
        kind = run.data.tags.get(TAG_BASELINE) or source_tags(str(row.get("source_run_id") or "")).get(TAG_BASELINE)
        hook = run.data.params.get("resolved.hook") or run.data.params.get("hook")
        sums = load_block_sums(str(row["run_id"]), client)
        if sums is None:
            continue
        (baselines if kind else trained).append((f"{row['label']}" + (f" [{kind}]" if kind else ""), hook, sums))
    if not baselines:
        raise InputError("--baseline found no analysis of a random baseline among the compared runs; train one with "
                         "`sae-mlops train --baseline frozen-decoder` (same model, hook and data), analyse it with "
                         "`sae-mlops quick`, then compare again.")
    if not trained:
        raise InputError("--baseline found only baseline analyses among the compared runs; include the trained SAEs' "
                         "analyses (check --experiment / --filter).")
    pairs = [((bl, bs), (tl, ts)) for tl, th, ts in trained for bl, bh, bs in baselines if bh == th]
    if not pairs:
        raise InputError("--baseline: no trained SAE shares a hook with a baseline among the compared runs.")
    rows = judge_pairs(pairs, alpha=alpha, resamples=resamples)
    note = (f"Each trained SAE (variant) against each random baseline of its hook (reference): {len(pairs)} pair(s), "
            f"95 % block-bootstrap intervals of variant - baseline ({resamples} resamples; paired where the two share "
            f"a token plan), Holm over all {len(rows)} tests at {alpha}. 'better' means the trained SAE beats random "
            "directions on that metric beyond token noise (arXiv 2602.14111's sanity check).")
    return rows, note


def _metric_key(text: str) -> str:
    """``text`` as a valid MLflow metric-name part."""
    import re

    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text.replace(" · ", "-")).strip("_")[:80] or "variant"


def _difference_metrics(rows: list[Any]) -> list[Any]:
    """The compare run's metrics: ``diff/<metric short>/<variant>`` and its interval bounds."""
    import math
    import time

    from mlflow.entities import Metric

    from sae_mlops.metrics import lookup

    now = int(time.time() * 1000)
    out = []
    for r in rows:
        m = lookup(r.metric)
        key = f"diff/{(m.short if m and m.short else r.metric.split('/')[-1])}/{_metric_key(r.variant)}"
        for name, value in ((key, r.diff), (key + CI_LOW, r.low), (key + CI_HIGH, r.high)):
            if value is not None and math.isfinite(value):
                out.append(Metric(name, float(value), now, 0))
    return out


def _compare_note(rows: list[Any], note: str) -> str:
    """The compare run's description: verdict counts per variant, then how they were reached."""
    from sae_mlops.core.verdicts import summary_counts

    refs = sorted({r.reference for r in rows})
    by_variant: dict[str, list[Any]] = {}
    for r in rows:
        by_variant.setdefault(r.variant if len(refs) == 1 else f"{r.variant} vs {r.reference}", []).append(r)
    title = refs[0] if len(refs) == 1 else f"{len(refs)} references (random baselines)"
    lines = [f"**Comparison against {title}**", ""]
    for variant, rs in by_variant.items():
        counts = summary_counts(rs)
        better = ", ".join(r.label for r in rs if r.verdict == "better") or "none"
        worse = ", ".join(r.label for r in rs if r.verdict == "worse") or "none"
        lines.append(f"- {variant}: better on {better}; worse on {worse}; "
                     f"{counts.get('within noise', 0)} within noise.")
    lines += ["", note, "", "The full table: `verdicts.md` / `README.html` among the artifacts."]
    return "\n".join(lines)
