"""MLflow for the feature commands (`match`, `dashboard`, `label`): the only place they touch MLflow.

- :func:`log_match` creates a run tagged ``sae_mlops.kind = match`` (or uses ``MLFLOW_RUN_ID``) that
  names both analyses and their SAEs: params ``a``, ``b`` (what the user gave), ``sae_a``, ``sae_b``,
  ``sae_hash_a``, ``sae_hash_b``, ``d_sae_a``, ``d_sae_b``; tags ``sae_mlops.match_a_run_id`` /
  ``sae_mlops.match_b_run_id`` (the analysis runs, when known) and a description linking them; the
  SAEs' LoggedModels (found through the analysis runs' lineage tags, else by content hash) as model
  inputs; the corpus as a dataset input (context ``match``); the ``match/...`` metrics; every
  output file as an artifact.
- :func:`log_to_analysis_run` logs files under an artifact directory of an existing analysis run,
  plus metrics and tags (dashboards, labels).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sae_mlops.tracking.lineage import (
    TAG_KIND,
    TAG_LOGGED_MODEL_ID,
    code_version_tags,
    corpus_dataset,
    find_source_by_hash,
    log_dataset_input,
)
from sae_mlops.tracking.resolve import TAG_SOURCE_LOGGED_MODEL_ID

log = logging.getLogger(__name__)

TAG_MATCH_A = "sae_mlops.match_a_run_id"
TAG_MATCH_B = "sae_mlops.match_b_run_id"
TAG_DASHBOARD = "sae_mlops.dashboard_index"
TAG_LABELS = "sae_mlops.labels"


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _logged_model(client: MlflowClient, run_id: str | None, sae_hash: str | None) -> str | None:
    if run_id:
        try:
            model_id = client.get_run(run_id).data.tags.get(TAG_SOURCE_LOGGED_MODEL_ID)
            if model_id:
                return model_id
        except MlflowException:
            pass
    if sae_hash:
        source = find_source_by_hash(str(sae_hash), client)
        if source is not None:
            return source.data.tags.get(TAG_LOGGED_MODEL_ID) or None
    return None


def log_match(
    inputs: dict[str, dict[str, Any]],
    metrics: dict[str, float],
    files: list[Path],
    out_dir: Path,
    run_ids: tuple[str | None, str | None],
    experiment: str | None = None,
    run_name: str | None = None,
) -> str:
    """Log a match to a new (or the ``MLFLOW_RUN_ID``) run; return its id."""
    from sae_mlops.tracking.runs import resolve_run

    client = MlflowClient()
    a, b = inputs["a"], inputs["b"]
    name = run_name or f"match {Path(str(a.get('sae'))).name} vs {Path(str(b.get('sae'))).name}"
    run_id, owned = resolve_run(client, experiment, name)
    try:
        for side, inp in (("a", a), ("b", b)):
            for key in ("given", "sae", "sae_hash", "d_sae", "corpus_digest"):
                pname = side if key == "given" else f"{key}_{side}"
                client.log_param(run_id, pname, str(inp.get(key))[:6000])
        tags = {TAG_KIND: "match", **code_version_tags()}
        note = ["Feature match of two analyses (see MATCH.md and plots/match_histograms.png).", ""]
        for tag, rid, side in ((TAG_MATCH_A, run_ids[0], "A"), (TAG_MATCH_B, run_ids[1], "B")):
            inp = inputs[side.lower()]
            sae = f"SAE `{inp.get('sae')}` (d_sae {inp.get('d_sae')})"
            if rid:
                tags[tag] = rid
                exp = client.get_run(rid).info.experiment_id
                note.append(f"- {side}: analysis run [{rid}](#/experiments/{exp}/runs/{rid}), {sae}")
            else:
                note.append(f"- {side}: analysis directory `{inp.get('dir')}`, {sae}")
        tags["mlflow.note.content"] = "\n".join(note)
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        for side, rid in (("a", run_ids[0]), ("b", run_ids[1])):
            model_id = _logged_model(client, rid, inputs[side].get("sae_hash"))
            if model_id:
                try:
                    client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
                    client.set_tag(run_id, f"sae_mlops.match_{side}_logged_model_id", model_id)
                except MlflowException as exc:
                    log.warning("could not link logged model %s: %s", model_id, exc.message)
        for side in ("a", "b"):  # the corpora as dataset inputs (one when both analyses read the same)
            if side == "b" and b.get("corpus_digest") == a.get("corpus_digest"):
                break
            dataset = corpus_dataset(inputs[side].get("corpus"), inputs[side].get("corpus_digest"))
            if dataset is not None:
                log_dataset_input(client, run_id, dataset, "match", inputs[side].get("corpus_digest"))
        for name, value in _finite(metrics).items():
            client.log_metric(run_id, name, value)
        for f in files:
            rel = Path(f).relative_to(out_dir).parent.as_posix()
            client.log_artifact(run_id, str(f), artifact_path=None if rel == "." else rel)
    except BaseException:
        if owned:
            client.set_terminated(run_id, "FAILED")
        raise
    if owned:
        client.set_terminated(run_id, "FINISHED")
    log.info("match logged to MLflow run %s", run_id)
    return run_id


def log_to_analysis_run(
    run_id: str,
    files: list[Path],
    base_dir: Path,
    artifact_dir: str,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
) -> list[str]:
    """Log ``files`` (paths under ``base_dir``) to run ``run_id`` under ``artifact_dir`` keeping
    their relative layout; log ``metrics`` and ``tags``. Returns the artifact paths."""
    client = MlflowClient()
    paths = []
    for f in files:
        rel = Path(f).relative_to(base_dir)
        sub = (Path(artifact_dir) / rel.parent).as_posix()
        client.log_artifact(run_id, str(f), artifact_path=sub)
        paths.append(f"{sub}/{rel.name}")
    for name, value in _finite(metrics or {}).items():
        client.log_metric(run_id, name, value)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    return paths


def log_labels(run_id: str, files: list[Path], base_dir: Path, metrics: dict[str, float], model: str, base_url: str | None, prompt_version: str) -> list[str]:
    """Log the label files under ``labels/`` of the analysis run, the ``label/...`` metrics, the
    labels as an MLflow table (``labels/labels_table.json``) and tags naming the model and endpoint
    (the endpoint without any user:password part; the API key is never logged)."""
    import pandas as pd

    from urllib.parse import urlsplit, urlunsplit

    endpoint = ""
    if base_url:
        parts = urlsplit(base_url)
        endpoint = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc, parts.path, "", ""))
    paths = log_to_analysis_run(
        run_id, files, base_dir, "labels", metrics,
        {TAG_LABELS: "labels/labels.jsonl", "sae_mlops.label_model": model, "sae_mlops.label_endpoint": endpoint or "api.openai.com",
         "sae_mlops.label_prompt_version": prompt_version},
    )
    table = next((f for f in files if Path(f).name == "labels.parquet"), None)
    if table is not None:
        MlflowClient().log_table(run_id, data=pd.read_parquet(table), artifact_file="labels/labels_table.json")
        paths.append("labels/labels_table.json")
    return paths


def download_labels(run_id: str, dst: Path, tracking_uri: str | None = None) -> bool:
    """Download the run's ``labels/labels.jsonl`` (written by `sae-mlops label`) and merge it into
    ``dst/labels/labels.jsonl``: a feature labelled locally keeps its local label (local progress of a
    resumed run is never overwritten), features only in the run are added. False when the run has none."""
    import mlflow.artifacts

    client = MlflowClient(tracking_uri=tracking_uri)
    if not any(f.path == "labels/labels.jsonl" for f in client.list_artifacts(run_id, "labels")):
        return False
    target = Path(dst) / "labels"
    target.mkdir(parents=True, exist_ok=True)  # a single file lands directly in dst_path
    from sae_mlops.tracking.artifacts import no_progress_bars

    import json
    import tempfile

    from sae_mlops.files import atomic_write_text

    local = target / "labels.jsonl"
    with tempfile.TemporaryDirectory(dir=target) as tmp, no_progress_bars():
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="labels/labels.jsonl", dst_path=tmp,
                                            tracking_uri=tracking_uri)
        remote = Path(tmp) / "labels.jsonl"
        records: dict[int, str] = {}
        for path in (remote, local):  # local last: it wins
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    records[int(json.loads(line)["feature"])] = line
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line (killed writer)
    atomic_write_text(local, "".join(records[f] + "\n" for f in sorted(records)))
    return True
