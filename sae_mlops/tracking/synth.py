"""MLflow records of `sae-mlops synth`: the world (once), the grid run, one training run per recipe.

- **world run** (``sae_mlops.kind = synth-world``): the saved ``SyntheticModel`` as artifacts under
  ``world/``, its config as params, tagged ``sae_mlops.synth.world_digest``. Built once: a later grid
  asking for a world of the same digest downloads it (:func:`find_world`, :func:`download_world`).
- **grid run** (``sae_mlops.kind = synth``; the ``mlflow run`` run under the MLproject entry point):
  the synth options as params, the report (``report/README.html`` with plots, CSVs) as artifacts, the
  proxies' rank correlations as ``synth/rho_<truth>_vs_<proxy>`` metrics, tags naming the world and
  the winning recipe.
- **recipe runs**: children of the grid run (``mlflow.parentRunId``), each a normal training run
  (``sae_mlops.kind = train``, via `sae_mlops.tracking.training.SourceRun`): the recipe as params,
  per-step training metrics, the ground-truth ``synth/*`` metrics (also linked to the logged model),
  the SAE (SAELens directory) as artifacts ``sae/`` and as a LoggedModel, tags
  ``sae_mlops.synth.world_digest`` / ``world_run_id`` / ``grid_run_id`` / ``recipe`` and, for a
  random baseline, ``sae_mlops.baseline``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from sae_mlops.tracking.artifacts import TAG_REPORT_HTML
from sae_mlops.tracking.lineage import TAG_KIND
from sae_mlops.tracking.runs import _experiment_id, flat_params, metric_key, resolve_run
from sae_mlops.tracking.training import TAG_BASELINE, SourceRun

log = logging.getLogger(__name__)

KIND_WORLD = "synth-world"
KIND_GRID = "synth"
TAG_WORLD_DIGEST = "sae_mlops.synth.world_digest"
TAG_WORLD_RUN = "sae_mlops.synth.world_run_id"
TAG_GRID_RUN = "sae_mlops.synth.grid_run_id"
TAG_RECIPE = "sae_mlops.synth.recipe"
TAG_WINNER = "sae_mlops.synth.winner_mcc"
WORLD_ARTIFACT = "world"
REPORT_ARTIFACT = "report"


def find_world(digest: str) -> str | None:
    """The run id of a finished world run of this digest (any experiment), or None."""
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`{TAG_KIND}` = '{KIND_WORLD}' and tags.`{TAG_WORLD_DIGEST}` = '{digest}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0].info.run_id if runs else None


def download_world(run_id: str, dest: Path) -> Path:
    """The world of run `run_id` downloaded into `dest`/world."""
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=WORLD_ARTIFACT, dst_path=str(dest)))


def log_world(directory: Path, digest: str, params: dict[str, Any], experiment: str | None) -> str:
    """A world run holding the saved world `directory` (see the module docstring); its id."""
    client = MlflowClient()
    run = client.create_run(
        _experiment_id(client, experiment),
        run_name=f"synth world {digest}",
        tags={TAG_KIND: KIND_WORLD, TAG_WORLD_DIGEST: digest},
    )
    run_id = run.info.run_id
    try:
        given, _ = flat_params(params, {})
        client.log_batch(run_id, params=given)
        client.log_artifacts(run_id, str(directory), artifact_path=WORLD_ARTIFACT)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    log.info("world %s logged as run %s", digest, run_id)
    return run_id


class GridRun:
    """The grid run (see the module docstring). Context manager: ends FINISHED, or FAILED on error."""

    def __init__(self, experiment: str | None, run_name: str):
        self.client = MlflowClient()
        self.experiment = experiment
        self.run_id, self._owned = resolve_run(self.client, experiment, run_name)
        self.client.set_tag(self.run_id, TAG_KIND, KIND_GRID)

    def __enter__(self) -> GridRun:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._owned:
            self.client.set_terminated(self.run_id, "FAILED" if exc_type else "FINISHED")

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        given, _ = flat_params(params, existing)
        self.client.log_batch(self.run_id, params=given)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        now = get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()])

    def log_recipe(
        self,
        *,
        name: str,
        params: dict[str, Any],
        tags: dict[str, Any],
        history: list[tuple[int, dict[str, float]]],
        metrics: dict[str, float],
        sae_dir: Path,
        sae_hash: str,
        model_params: dict[str, Any],
        architecture: str,
    ) -> str:
        """One recipe's child training run (see the module docstring); its id."""
        with SourceRun("train", run_name=name, parent_run_id=self.run_id) as run:
            run.set_tags({TAG_GRID_RUN: self.run_id, **tags})
            run.log_params(params)
            for step, m in history:
                run.log_metrics(step, m)
            run.finish_with_sae(sae_dir, sae_hash, model_params=model_params, architecture=architecture, summary=metrics)
            return run.run_id

    def log_report(self, report_dir: Path) -> None:
        """The report directory as artifacts under ``report/``; tag its HTML page."""
        self.client.log_artifacts(self.run_id, str(report_dir), artifact_path=REPORT_ARTIFACT)
        self.client.set_tag(self.run_id, TAG_REPORT_HTML, f"{REPORT_ARTIFACT}/README.html")


__all__ = [
    "GridRun", "KIND_GRID", "KIND_WORLD", "TAG_BASELINE", "TAG_GRID_RUN", "TAG_RECIPE", "TAG_WINNER",
    "TAG_WORLD_DIGEST", "TAG_WORLD_RUN", "download_world", "find_world", "log_world",
]
