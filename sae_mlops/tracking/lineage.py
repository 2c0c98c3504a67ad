"""Lineage between SAE training/import runs, logged models, registered versions and analyses.

What links what (all tag names are constants below):

- A **source run** (``sae-mlops train`` or ``sae-mlops import``) is tagged ``sae_mlops.kind`` =
  ``train`` / ``import``, ``sae_mlops.sae_source=true``, ``sae_mlops.sae_hash`` (sha256 over the SAE
  directory's files, as `sae_mlops.sources.hashing.sha256_directory` computes it),
  ``sae_mlops.logged_model_id`` and, once registered, ``sae_mlops.registered_model_name`` /
  ``..._version``. Its SAE is an MLflow 3 LoggedModel (``source_run_id`` = the run) and optionally a
  registered model version whose source is ``models:/<logged model id>``.
- An **analysis run** (quick or full, through `sae_mlops.tracking.runs.log_analysis`) records:

  * tags ``sae_mlops.source_run_id``, ``sae_mlops.source_logged_model_id``,
    ``sae_mlops.source_model_name``, ``sae_mlops.source_model_version`` (and ``..._alias``): from the
    ``runs:/`` / ``models:/`` URI it was given (`sae_mlops.tracking.resolve`) or, for a local
    directory, from the source run whose ``sae_mlops.sae_hash`` equals the SAE's content hash
    (``sae_mlops.lineage_resolved_by`` says which: ``uri`` or ``content_hash``);
  * ``sae_mlops.recipe_hash`` and ``sae_mlops.seed``, copied from the source run when it has them
    (``sae-mlops train``; ``train --seeds N``: the analyses of one recipe's seeds share the hash);
  * ``sae_mlops.sae_hash``; the code version (``sae_mlops.code_version`` = package version plus
    ``+g<commit>`` and ``.dirty`` when run from a git checkout, ``sae_mlops.git_commit``);
  * the corpus as an ``mlflow.data`` dataset input (context ``analysis``; digest = the first 16 hex
    digits of the corpus file's sha256, the full one in the input tag ``sae_mlops.corpus_sha256``);
  * the LoggedModel as a model input (``log_inputs(models=[LoggedModelInput(id)])``), and its metrics
    are logged with ``model_id`` and the dataset, so they show on the logged model's page.

  After logging, the registered model version and the logged model get the tag
  ``sae_mlops.latest_analysis_run_id``, and the version's description links that run (a markdown
  link the model version page renders, with the run's headline metrics).

Queries: :func:`find_analyses` (model version -> analysis runs), :func:`training_run_of`
(analysis run -> source run id), :func:`lineage_of` (everything an analysis run links to),
:func:`find_source_by_hash` (content hash -> source run).
"""

from __future__ import annotations

import functools
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelInput, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sae_mlops import __version__
from sae_mlops.tracking.resolve import (
    TAG_SOURCE_LOGGED_MODEL_ID,
    TAG_SOURCE_MODEL_ALIAS,
    TAG_SOURCE_MODEL_NAME,
    TAG_SOURCE_MODEL_VERSION,
    TAG_SOURCE_RUN_ID,
    TAG_SOURCE_URI,
)

log = logging.getLogger(__name__)

TAG_KIND = "sae_mlops.kind"
TAG_SAE_HASH = "sae_mlops.sae_hash"
TAG_SAE_SOURCE = "sae_mlops.sae_source"
TAG_LOGGED_MODEL_ID = "sae_mlops.logged_model_id"
TAG_REGISTERED_NAME = "sae_mlops.registered_model_name"
TAG_REGISTERED_VERSION = "sae_mlops.registered_model_version"
TAG_RESOLVED_BY = "sae_mlops.lineage_resolved_by"
TAG_CODE_VERSION = "sae_mlops.code_version"
TAG_GIT_COMMIT = "sae_mlops.git_commit"
TAG_DATASET_DIGEST = "sae_mlops.dataset_digest"
TAG_LATEST_ANALYSIS = "sae_mlops.latest_analysis_run_id"
TAG_LINEAGE_ERROR = "sae_mlops.lineage_error"
#: on training runs (``train``, ``train --seeds``), copied onto the analyses of their SAEs
TAG_RECIPE_HASH = "sae_mlops.recipe_hash"
TAG_SEED = "sae_mlops.seed"
INPUT_TAG_CORPUS_SHA256 = "sae_mlops.corpus_sha256"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"

SOURCE_KINDS = ("train", "import")
ANALYSIS_KINDS = ("quick", "full")
DATASET_DIGEST_LEN = 16  # MLflow's SQL stores hold dataset digests of at most 36 characters
MODEL_TYPE = "sae"

__all__ = [
    "AnalysisLink",
    "code_version_tags",
    "corpus_dataset",
    "find_analyses",
    "find_source_by_hash",
    "lineage_of",
    "training_run_of",
]


# --- code version ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool]:
    """(commit, dirty) of the git checkout holding this package, or (None, False) outside one."""
    here = Path(__file__).resolve().parent
    try:
        # Only when this package's files are tracked there (an editable install in its checkout), not
        # when an installed copy merely sits inside some other repository (a venv in a project).
        subprocess.run(
            ["git", "-C", str(here), "ls-files", "--error-unmatch", Path(__file__).name],
            capture_output=True, timeout=5, check=True,
        )
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, False
    return (commit or None), bool(status)


def code_version_tags() -> dict[str, str]:
    """``sae_mlops.code_version`` (``0.1.0+g<12 hex>[.dirty]`` in a git checkout, else the package
    version) and, when known, ``sae_mlops.git_commit``."""
    commit, dirty = git_state()
    if not commit:
        return {TAG_CODE_VERSION: __version__}
    version = f"{__version__}+g{commit[:12]}" + (".dirty" if dirty else "")
    return {TAG_CODE_VERSION: version, TAG_GIT_COMMIT: commit}


# --- datasets ----------------------------------------------------------------------------------


def corpus_dataset(path: str | None, sha256: str | None):
    """An ``mlflow.data`` MetaDataset for a corpus file: name = file name, source = its path,
    digest = the first 16 hex digits of its sha256. None without a digest (nothing to identify)."""
    if not sha256:
        return None
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import ColSpec, Schema

    where = str(path or "corpus")
    name = Path(where).name or where
    source_uri = str(Path(where).resolve()) if Path(where).exists() else where
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local files
        source = resolve_dataset_source(source_uri)
    return MetaDataset(  # type: ignore[abstract]  # mlflow's concrete metadata-only dataset
        source=source,
        name=name,
        digest=str(sha256)[:DATASET_DIGEST_LEN],
        schema=Schema([ColSpec("string", "text")]),
    )


def log_dataset_input(client: MlflowClient, run_id: str, dataset, context: str, sha256: str | None, extra_tags: dict[str, str] | None = None) -> None:
    """``log_inputs`` of `dataset` with the context tag and the full sha256 as input tags."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    if sha256:
        tags.append(InputTag(INPUT_TAG_CORPUS_SHA256, str(sha256)))
    for k, v in (extra_tags or {}).items():
        tags.append(InputTag(k, str(v)))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


# --- searching ---------------------------------------------------------------------------------


def all_experiment_ids(client: MlflowClient) -> list[str]:
    """Ids of every active experiment in the store."""
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def search_runs_everywhere(
    client: MlflowClient,
    filter_string: str,
    experiment_ids: list[str] | None = None,
    order_by: list[str] | None = None,
    max_results: int | None = None,
) -> list[Run]:
    """`search_runs` over `experiment_ids` (default: all active experiments), every page."""
    ids = experiment_ids if experiment_ids is not None else all_experiment_ids(client)
    out: list[Run] = []
    for start in range(0, len(ids), 50):
        token = None
        while True:
            page = client.search_runs(
                ids[start : start + 50],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                order_by=order_by,
                page_token=token,
            )
            out.extend(page)
            token = page.token
            if not token or (max_results is not None and len(out) >= max_results):
                break
    return out


def quote(value: str) -> str:
    """A value for an MLflow filter string ('...' with quotes escaped)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def tag_clause(key: str, value: str) -> str:
    return f"tags.`{key}` = {quote(value)}"


def find_source_by_hash(sae_hash: str, client: MlflowClient | None = None) -> Run | None:
    """The earliest FINISHED training/import run whose SAE has content hash `sae_hash`, or None (a
    FAILED or KILLED one, e.g. an import whose registration failed, never hides the SAE from a later
    import)."""
    client = client or MlflowClient()
    runs = search_runs_everywhere(
        client,
        f"{tag_clause(TAG_SAE_HASH, sae_hash)} and {tag_clause(TAG_SAE_SOURCE, 'true')}",
        order_by=["attributes.start_time ASC"],
    )
    runs = [r for r in runs if r.data.tags.get(TAG_KIND) in SOURCE_KINDS and r.info.status == "FINISHED"]
    runs.sort(key=lambda r: r.info.start_time or 0)
    return runs[0] if runs else None


def latest_version_of_logged_model(client: MlflowClient, run: Run, model_id: str | None) -> Any | None:
    """The newest registered version made from `model_id` (searched by its source run), or None."""
    if not model_id:
        return None
    try:
        versions = client.search_model_versions(f"run_id = {quote(run.info.run_id)}")
    except MlflowException as exc:
        log.debug("could not search model versions of run %s: %s", run.info.run_id, exc)
        return None
    mine = [v for v in versions if model_id_of_version(v) == model_id]
    return max(mine, key=lambda v: int(v.version)) if mine else None


def model_id_of_version(version: Any) -> str | None:
    """The LoggedModel id behind a model version (its ``model_id``, else a ``models:/m-...`` source)."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return model_id
    source = getattr(version, "source", "") or ""
    if source.startswith("models:/m-"):
        return source[len("models:/") :].strip("/")
    return None


# --- recording the lineage of an analysis run ----------------------------------------------------


@dataclass
class AnalysisLink:
    """What `record_analysis_lineage` found and logged for one analysis run."""

    tags: dict[str, str] = field(default_factory=dict)
    model_id: str | None = None
    dataset_name: str | None = None
    dataset_digest: str | None = None
    model_name: str | None = None
    model_version: str | None = None


def record_analysis_lineage(client: MlflowClient, run_id: str, result: Any) -> AnalysisLink:
    """Resolve and log the lineage of an analysis `result` being logged into run `run_id`.

    Returns the tags to add (the caller logs them with the result's own tags) and the logged-model id
    and dataset its metrics should be linked to. Logs the dataset and LoggedModel inputs itself.
    """
    link = AnalysisLink()
    tags = {str(k): str(v) for k, v in result.tags.items()}
    params = result.params
    link.tags.update(code_version_tags())
    commit = link.tags.get(TAG_GIT_COMMIT)
    if commit:
        existing = client.get_run(run_id).data.tags
        if MLFLOW_GIT_COMMIT not in existing:
            link.tags[MLFLOW_GIT_COMMIT] = commit

    sae_hash = tags.get(TAG_SAE_HASH) or params.get("sae_hash")
    if tags.get(TAG_SOURCE_RUN_ID) or tags.get(TAG_SOURCE_MODEL_NAME) or tags.get(TAG_SOURCE_LOGGED_MODEL_ID):
        link.tags[TAG_RESOLVED_BY] = "uri"
        model_id = tags.get(TAG_SOURCE_LOGGED_MODEL_ID)
        if not model_id and tags.get(TAG_SOURCE_RUN_ID):
            model_id = _logged_model_of_run(client, tags[TAG_SOURCE_RUN_ID])
            if model_id:
                link.tags[TAG_SOURCE_LOGGED_MODEL_ID] = model_id
        link.model_id = model_id
        link.model_name = tags.get(TAG_SOURCE_MODEL_NAME)
        link.model_version = tags.get(TAG_SOURCE_MODEL_VERSION)
    elif sae_hash:
        source = find_source_by_hash(str(sae_hash), client)
        if source is not None:
            link.tags[TAG_RESOLVED_BY] = "content_hash"
            link.tags[TAG_SOURCE_RUN_ID] = source.info.run_id
            model_id = source.data.tags.get(TAG_LOGGED_MODEL_ID)
            if model_id:
                link.tags[TAG_SOURCE_LOGGED_MODEL_ID] = model_id
                link.model_id = model_id
            version = latest_version_of_logged_model(client, source, model_id)
            if version is not None:
                link.model_name, link.model_version = version.name, str(version.version)
                link.tags[TAG_SOURCE_MODEL_NAME] = version.name
                link.tags[TAG_SOURCE_MODEL_VERSION] = str(version.version)
            log.info("SAE content hash %s matches source run %s", str(sae_hash)[:12], source.info.run_id)
        else:
            link.tags[TAG_RESOLVED_BY] = "none"
    else:
        link.tags[TAG_RESOLVED_BY] = "none"

    source_run = link.tags.get(TAG_SOURCE_RUN_ID) or tags.get(TAG_SOURCE_RUN_ID)
    if source_run:  # seeds of one recipe: the analyses carry the recipe hash and seed of their training run
        try:
            source_tags = client.get_run(source_run).data.tags
            link.tags.update({k: source_tags[k] for k in (TAG_RECIPE_HASH, TAG_SEED) if k in source_tags})
        except MlflowException as exc:
            log.debug("source run %s not readable for its recipe tags: %s", source_run, exc.message)

    if link.model_id:
        try:
            client.get_logged_model(link.model_id)
            client.log_inputs(run_id, models=[LoggedModelInput(link.model_id)])
        except MlflowException as exc:
            log.warning("logged model %s is not in this store (%s); metrics not linked to it", link.model_id, exc.message)
            link.model_id = None

    digest = params.get("corpus_digest")
    dataset = corpus_dataset(params.get("corpus"), digest)
    if dataset is not None:
        extra = {"sae_mlops.documents": params.get("corpus_documents"), "sae_mlops.format": params.get("corpus_format")}
        log_dataset_input(client, run_id, dataset, "analysis", digest, {k: v for k, v in extra.items() if v is not None})
        link.dataset_name, link.dataset_digest = dataset.name, dataset.digest
        link.tags[TAG_DATASET_DIGEST] = str(digest)
    return link


def after_analysis_logged(client: MlflowClient, run_id: str, link: AnalysisLink, headline: str = "") -> None:
    """Point the registered version (tag and description link) and the logged model (tag) at their
    newest analysis run."""
    if link.model_name and link.model_version:
        try:
            client.set_model_version_tag(link.model_name, link.model_version, TAG_LATEST_ANALYSIS, run_id)
            run = client.get_run(run_id)
            title = (run.info.run_name or run_id).replace("[", "(").replace("]", ")")
            description = (
                f"Latest analysis: [{title}](#/experiments/{run.info.experiment_id}/runs/{run_id})"
                + (f" · {headline}" if headline else "")
                + f"\n\nAll analyses of this version: the runs whose tags `sae_mlops.source_model_name` = `{link.model_name}`"
                f" and `sae_mlops.source_model_version` = `{link.model_version}`."
            )
            before = (client.get_model_version(link.model_name, link.model_version).description or "").strip()
            if before and not before.startswith("Latest analysis:"):
                description += "\n\n" + before  # a description someone wrote stays, below ours
            client.update_model_version(link.model_name, link.model_version, description=description)
        except MlflowException as exc:
            log.warning("could not tag %s v%s with the analysis run: %s", link.model_name, link.model_version, exc.message)
    if link.model_id:
        try:
            client.set_logged_model_tags(link.model_id, {TAG_LATEST_ANALYSIS: run_id})
        except MlflowException as exc:
            log.warning("could not tag logged model %s with the analysis run: %s", link.model_id, exc.message)


def _logged_model_of_run(client: MlflowClient, run_id: str) -> str | None:
    try:
        return client.get_run(run_id).data.tags.get(TAG_LOGGED_MODEL_ID)
    except MlflowException:
        return None


# --- queries -------------------------------------------------------------------------------------


def find_analyses(model_name: str, version: str | int, client: MlflowClient | None = None) -> list[Run]:
    """Analysis runs (quick/full) of registered model `model_name` version `version`, newest first.

    Matches runs tagged with that name and version, and runs of the same LoggedModel (analyses given
    ``runs:/`` or ``models:/m-...`` URIs, or a local copy recognised by hash, before it was registered).
    """
    from sae_mlops.tracking.resolve import call_mlflow

    client = client or MlflowClient()
    version = str(version)
    mv = call_mlflow(
        lambda: client.get_model_version(model_name, version),
        f"Registered model {model_name!r} has no version {version} in this tracking store; check the name and version.",
    )
    clauses = [f"{tag_clause(TAG_SOURCE_MODEL_NAME, model_name)} and {tag_clause(TAG_SOURCE_MODEL_VERSION, version)}"]
    model_id = model_id_of_version(mv)
    if model_id:
        clauses.append(tag_clause(TAG_SOURCE_LOGGED_MODEL_ID, model_id))
    ids = all_experiment_ids(client)
    found: dict[str, Run] = {}
    for clause in clauses:
        for run in search_runs_everywhere(client, clause, ids):
            if run.data.tags.get(TAG_KIND) in ANALYSIS_KINDS:
                found[run.info.run_id] = run
    return sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True)


def lineage_of(analysis_run_id: str, client: MlflowClient | None = None) -> dict[str, str | None]:
    """What analysis run `analysis_run_id` links to: source run, logged model, model name/version,
    SAE hash, dataset digest, code version, and how the source was resolved."""
    from sae_mlops.tracking.resolve import call_mlflow

    client = client or MlflowClient()
    run = call_mlflow(
        lambda: client.get_run(analysis_run_id),
        f"MLflow run {analysis_run_id} does not exist in this tracking store; check the run id and MLFLOW_TRACKING_URI.",
    )
    t = run.data.tags
    out: dict[str, str | None] = {
        "run_id": analysis_run_id,
        "kind": t.get(TAG_KIND),
        "source_run_id": t.get(TAG_SOURCE_RUN_ID),
        "logged_model_id": t.get(TAG_SOURCE_LOGGED_MODEL_ID),
        "model_name": t.get(TAG_SOURCE_MODEL_NAME),
        "model_version": t.get(TAG_SOURCE_MODEL_VERSION),
        "model_alias": t.get(TAG_SOURCE_MODEL_ALIAS),
        "source_uri": t.get(TAG_SOURCE_URI),
        "sae_hash": t.get(TAG_SAE_HASH),
        "dataset_digest": t.get(TAG_DATASET_DIGEST),
        "code_version": t.get(TAG_CODE_VERSION),
        "resolved_by": t.get(TAG_RESOLVED_BY),
    }
    if not out["source_run_id"] and out["sae_hash"]:
        source = find_source_by_hash(str(out["sae_hash"]), client)
        if source is not None:
            out["source_run_id"] = source.info.run_id
            out["logged_model_id"] = out["logged_model_id"] or source.data.tags.get(TAG_LOGGED_MODEL_ID)
            out["resolved_by"] = "content_hash"
    return out


def training_run_of(analysis_run_id: str, client: MlflowClient | None = None) -> str | None:
    """The id of the run that trained (or imported) the SAE analysed in run `analysis_run_id`, or None
    when it is not known (an SAE from elsewhere never imported). InputError for an unknown run."""
    return lineage_of(analysis_run_id, client)["source_run_id"]

