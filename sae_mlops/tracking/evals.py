"""Log eval results (`sae_mlops.evals`) to MLflow.

An eval logs into an existing run (``--run-id``: the SAE's analysis run, or the run the suite's core
analysis just made) or into a new run tagged ``sae_mlops.kind=<probe|evals>``, the SAE's content hash
(``sae_mlops.sae_hash``), its lineage tags (source training run, registered model), and
``sae_mlops.analysis_run_id``: the latest quick/full analysis run of the same SAE hash when one
exists, so the UI links eval and analysis. Metrics go in as they are (non-finite values are
skipped), files under ``evals/``, PNGs also as images, and tags name the evals run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from sae_mlops.tracking.lineage import ANALYSIS_KINDS, TAG_KIND, TAG_SAE_HASH, all_experiment_ids, search_runs_everywhere
from sae_mlops.tracking.runs import resolve_run

log = logging.getLogger(__name__)

TAG_ANALYSIS_RUN = "sae_mlops.analysis_run_id"
TAG_EVALS = "sae_mlops.evals"
ARTIFACT_DIR = "evals"


def latest_analysis_run(client: MlflowClient, sae_hash: str | None) -> str | None:
    """The newest quick/full analysis run of the SAE with this content hash, in any experiment."""
    if not sae_hash:
        return None
    runs = search_runs_everywhere(client, f"tags.`{TAG_SAE_HASH}` = '{sae_hash}'", all_experiment_ids(client),
                                  order_by=["attributes.start_time DESC"])
    return next((r.info.run_id for r in runs if r.data.tags.get(TAG_KIND) in ANALYSIS_KINDS), None)


def start_eval_run(kind: str, name: str, tags: dict[str, str], experiment: str | None = None,
                   run_name: str | None = None) -> tuple[str, bool]:
    """A new run for an eval (or the run of ``MLFLOW_RUN_ID``), tagged with `tags`, the kind and the
    link to the SAE's latest analysis run. Returns (run id, whether this program finishes it)."""
    client = MlflowClient()
    run_id, owned = resolve_run(client, experiment, run_name, default_name=name)
    all_tags = {TAG_KIND: kind, **tags}
    analysis = latest_analysis_run(client, tags.get(TAG_SAE_HASH))
    if analysis:
        all_tags[TAG_ANALYSIS_RUN] = analysis
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    return run_id, owned


def log_eval_results(run_id: str, metrics: dict[str, float], files: list[Path], base_dir: Path, evals: list[str],
                     params: dict[str, str] | None = None) -> None:
    """Metrics, params (those not yet on the run), the files under ``evals/`` (relative layout kept) and the
    ``sae_mlops.evals`` tag (the evals in the run, added to what it already lists)."""
    client = MlflowClient()
    now = get_current_time_millis()
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])
    run = client.get_run(run_id)
    if params:
        from mlflow.entities import Param

        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in run.data.params]
        if new:
            client.log_batch(run_id, params=new)
    had = [e for e in run.data.tags.get(TAG_EVALS, "").split(",") if e]
    client.set_tag(run_id, TAG_EVALS, ",".join(dict.fromkeys(had + evals)))
    for f in files:
        rel = Path(f).relative_to(base_dir)
        client.log_artifact(run_id, str(f), artifact_path=(Path(ARTIFACT_DIR) / rel.parent).as_posix())
    log.info("logged %d eval metric(s) and %d file(s) to MLflow run %s", len(batch), len(files), run_id)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)
