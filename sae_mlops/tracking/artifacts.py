"""Reading an analysis run's artifacts from MLflow and logging report files back to a run.

- :func:`download_analysis` checks that a run exists and holds a full analysis (the feature
  summaries ``results/feature_summaries.jsonl``, or ``feature_summaries_<ts>.jsonl`` as older
  versions named them), then downloads what the interpretation
  notebook reads: the top-level files, ``results/``, ``matrices/`` and, only when asked,
  ``activation_database/`` (the largest part; the notebook does not need it).
- :func:`log_report` logs files (the executed notebook, its HTML) under one artifact directory of
  an existing run, finished or not, and sets the tags :data:`TAG_REPORT` and :data:`TAG_REPORT_HTML`.

The tracking store is ``tracking_uri`` when given, else ``MLFLOW_TRACKING_URI`` / MLflow's default.
"""

from __future__ import annotations

import logging
from typing import Any
import os
from contextlib import contextmanager
from pathlib import Path

from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

REPORT_DIR = "report"
TAG_REPORT = "sae_mlops.report"  # artifact path of the executed notebook
TAG_REPORT_HTML = "sae_mlops.report_html"  # artifact path of its HTML rendering
TAG_REPORT_OF = "sae_mlops.report_of_run"  # on a run made only to build a report: the analysis run
DOWNLOADED = ("results", "matrices")
FULL_HINT = "run `sae-mlops full --sae ...` (or `mlflow run . -e full`) first and report on that run"


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _store(tracking_uri: str | None) -> str:
    import mlflow

    return tracking_uri or mlflow.get_tracking_uri()


def check_analysis_run(run_id: str, tracking_uri: str | None = None) -> list[str]:
    """The artifact paths under ``results/`` of run ``run_id``; InputError when the run does not
    exist or holds no feature summaries (a quick analysis, or not an analysis run)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise InputError(f"no MLflow run '{run_id}' in {_store(tracking_uri)} ({e.error_code}); check the run id and MLFLOW_TRACKING_URI.") from e
    results = [f.path for f in client.list_artifacts(run_id, "results")]
    if not any(Path(p).name.startswith("feature_summaries") and p.endswith(".jsonl") for p in results):
        kind = run.data.tags.get("sae_mlops.kind")
        what = f"a {kind} analysis" if kind else "not an sae-mlops analysis run"
        raise InputError(f"MLflow run '{run_id}' has no feature summaries (results/feature_summaries.jsonl): it is {what}; {FULL_HINT}.")
    return results


def download_analysis(run_id: str, dst: Path, tracking_uri: str | None = None, activation_db: bool = False) -> Path:
    """Download run ``run_id``'s full-analysis artifacts into ``dst`` (created); return ``dst``.

    Raises InputError (see :func:`check_analysis_run`) before downloading anything from a run that
    is not a full analysis.
    """
    import mlflow.artifacts

    check_analysis_run(run_id, tracking_uri)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    wanted = set(DOWNLOADED) | ({"activation_database"} if activation_db else set())
    with no_progress_bars():
        for entry in _client(tracking_uri).list_artifacts(run_id):
            if entry.is_dir and entry.path not in wanted:
                continue
            log.info("downloading %s of run %s", entry.path, run_id)
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=entry.path, dst_path=str(dst), tracking_uri=tracking_uri)
    return dst


@contextmanager
def no_progress_bars():
    """MLflow's per-download progress bars, off for a handful of small files (restored after)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def log_report(
    run_id: str,
    files: list[Path],
    tracking_uri: str | None = None,
    artifact_dir: str = REPORT_DIR,
    tags: dict[str, str] | None = None,
) -> list[str]:
    """Log ``files`` to run ``run_id`` under ``artifact_dir``; tag the notebook and HTML paths.
    Returns the artifact paths."""
    client = _client(tracking_uri)
    paths = []
    all_tags = dict(tags or {})
    for f in files:
        f = Path(f)
        client.log_artifact(run_id, str(f), artifact_path=artifact_dir)
        path = f"{artifact_dir}/{f.name}"
        paths.append(path)
        if f.suffix == ".ipynb":
            all_tags[TAG_REPORT] = path
        elif f.suffix == ".html":
            all_tags[TAG_REPORT_HTML] = path
    for k, v in all_tags.items():
        client.set_tag(run_id, k, v)
    log.info("logged %s to MLflow run %s", ", ".join(paths), run_id)
    return paths


def artifact_paths(run_id: str, path: str | None = None, tracking_uri: str | None = None) -> list[str]:
    """File artifact paths of a run directly under ``path`` (default: the root)."""
    return [f.path for f in _client(tracking_uri).list_artifacts(run_id, path)]


def load_block_sums(run_id: str, client: Any = None) -> Any:
    """The per-block sums (:class:`sae_mlops.core.intervals.BlockSums`) an analysis run logged as
    ``results/blocks.{json,safetensors}``; None when the run has none (analysed before intervals
    existed, or not an analysis run)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from sae_mlops.core.intervals import FILE_STEM, BlockSums

    client = client or MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id, "results")}
    if f"results/{FILE_STEM}.json" not in names or f"results/{FILE_STEM}.safetensors" not in names:
        return None
    with tempfile.TemporaryDirectory(prefix="sae-mlops-blocks-") as tmp:
        # A local store puts a downloaded file at <tmp>/<name>, an HTTP one at <tmp>/results/<name>:
        # read both from where MLflow says it put them.
        paths = [Path(client.download_artifacts(run_id, f"results/{FILE_STEM}.{suffix}", tmp))
                 for suffix in ("json", "safetensors")]
        return BlockSums.load(paths[0].parent)
