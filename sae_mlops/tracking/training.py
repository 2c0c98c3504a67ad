"""Source runs: an SAE trained here (``sae-mlops train``) or imported (``sae-mlops import``).

:class:`SourceRun` is what `sae_mlops.training` calls (it never imports mlflow itself): it opens
the run (``MLFLOW_RUN_ID`` under ``mlflow run``, else a new run in the experiment), logs the config
as params and the corpus as a ``training`` dataset input, takes per-step metrics through
:meth:`SourceRun.log_metrics` (buffered, sent in batches), and :meth:`SourceRun.finish_with_sae`
logs the SAE directory as run artifacts (``sae/``) and as a LoggedModel, optionally registered.

:func:`import_sae` makes a source run for an SAE directory trained elsewhere. The prior tool's
``history.json`` becomes per-epoch metrics (step = epoch index): ``loss`` -> ``train/loss``,
``recon_loss`` -> ``train/mse``, ``sparsity`` -> ``train/l0``, ``dead_features`` ->
``train/dead_features``, every other key ``k`` -> ``train/k`` (``val_loss`` -> ``train/val_loss``).
An SAE whose content hash is already the ``sae_mlops.sae_hash`` of a train/import run is not
imported again: the existing run is returned (and registered under ``--register`` if asked).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from sae_mlops.tracking import lineage
from sae_mlops.tracking.lineage import (
    TAG_KIND,
    TAG_LOGGED_MODEL_ID,
    TAG_REGISTERED_NAME,
    TAG_REGISTERED_VERSION,
    TAG_SAE_HASH,
    TAG_SAE_SOURCE,
)
from sae_mlops.tracking.registry import Registration, log_sae_model, register_sae_model, version_tags
from sae_mlops.tracking.runs import flat_params, metric_key, resolve_run

log = logging.getLogger(__name__)

SAE_ARTIFACT_PATH = "sae"
#: Tag of a training run that trained a random baseline (its value: the baseline's name).
TAG_BASELINE = "sae_mlops.baseline"
HISTORY_NAMES = {
    "loss": "train/loss",
    "recon_loss": "train/mse",
    "sparsity": "train/l0",
    "dead_features": "train/dead_features",
}
_FLUSH_METRICS = 1000  # buffered training metrics sent in one log_batch (MLflow's per-request limit)
_FLUSH_EVERY_S = 5.0


@dataclass
class SourceOutcome:
    """A training or import run and what it produced."""

    run_id: str
    kind: str  # "train" | "import"
    sae_hash: str
    model_id: str | None
    sae_dir: Path | None = None
    registration: Registration | None = None
    existing: bool = False  # import: the SAE was already in the store (same content hash)
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str | None = None

    @property
    def model_uri(self) -> str | None:
        if self.registration and self.registration.alias:
            return f"models:/{self.registration.name}@{self.registration.alias}"
        if self.registration:
            return f"models:/{self.registration.name}/{self.registration.version}"
        return f"models:/{self.model_id}" if self.model_id else None


class SourceRun:
    """One MLflow run recording where an SAE came from. Use as a context manager: a run created here
    ends FINISHED, or FAILED when the block raises."""

    def __init__(self, kind: str, experiment: str | None = None, run_name: str | None = None,
                 parent_run_id: str | None = None):
        self.kind = kind
        self.client = MlflowClient()
        if parent_run_id:  # a child run (one seed of `train --seeds N`): always a new run, in the parent's experiment
            self.run_id, self._owned = create_child_run(self.client, parent_run_id, run_name), True
        else:
            self.run_id, self._owned = resolve_run(self.client, experiment, run_name)
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._last: dict[str, float] = {}
        tags = {TAG_KIND: kind, **lineage.code_version_tags()}
        self.set_tags(tags)

    def __enter__(self) -> SourceRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.flush()
        finally:
            if self._owned:
                self.client.set_terminated(self.run_id, "FAILED" if exc_type else "FINISHED")

    # params / tags / inputs

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        given, conflicts = flat_params(params, existing)
        self.client.log_batch(self.run_id, params=given)  # log_batch splits into MLflow\'s batch limits itself
        if conflicts:  # given first (e.g. None = "default"), then the resolved value: resolved.<name>
            self.set_tags({"sae_mlops.resolved_params": ",".join(conflicts)})

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(metric_key(str(k)), str(v)) for k, v in tags.items() if v is not None]
        self.client.log_batch(self.run_id, tags=items)  # log_batch splits into MLflow\'s batch limits itself

    def log_corpus(self, path: str, sha256: str | None, documents: int | None = None) -> None:
        """The training corpus as an ``mlflow.data`` dataset input (context ``training``)."""
        dataset = lineage.corpus_dataset(path, sha256)
        if dataset is not None:
            extra = {"sae_mlops.documents": str(documents)} if documents is not None else {}
            lineage.log_dataset_input(self.client, self.run_id, dataset, "training", sha256, extra)

    # metrics

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Per-step metrics (finite numbers only), sent in batches."""
        now = get_current_time_millis()
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                continue
            self._buffer.append(Metric(metric_key(str(k)), value, now, int(step)))
            self._last[str(k)] = value
        if len(self._buffer) >= _FLUSH_METRICS or time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        self.client.log_batch(self.run_id, metrics=buffer)  # log_batch splits into MLflow\'s batch limits itself
        self._last_flush = time.monotonic()

    @property
    def last_metrics(self) -> dict[str, float]:
        return dict(self._last)

    # the SAE

    def finish_with_sae(
        self,
        sae_dir: Path,
        sae_hash: str,
        *,
        model_params: dict[str, Any],
        architecture: str | None,
        summary: dict[str, float] | None = None,
        register: str | None = None,
        alias: str | None = None,
    ) -> SourceOutcome:
        """Log `sae_dir` as artifacts under ``sae/`` and as a LoggedModel (with `summary` metrics
        linked to it), register it when `register` names a model; tag the run with the hash."""
        self.flush()
        self.set_tags({TAG_SAE_HASH: sae_hash, TAG_SAE_SOURCE: "true"})
        self.client.log_artifacts(self.run_id, str(sae_dir), artifact_path=SAE_ARTIFACT_PATH)
        model_tags = version_tags(sae_hash, architecture)
        from sae_mlops.naming import model_name

        model_id = log_sae_model(
            self.client, self.run_id, sae_dir, params=model_params, tags=model_tags, name=model_name(Path(sae_dir).name)
        )
        if summary:
            now = get_current_time_millis()
            metrics = [
                Metric(metric_key(k), float(v), now, 0, model_id=model_id)
                for k, v in summary.items()
                if v is not None and math.isfinite(float(v))
            ]
            self.client.log_batch(self.run_id, metrics=metrics)  # log_batch splits into MLflow\'s batch limits itself
        registration = None
        if register:
            registration = register_sae_model(self.client, model_id, self.run_id, register, alias, tags=model_tags)
        return SourceOutcome(
            run_id=self.run_id,
            kind=self.kind,
            sae_hash=sae_hash,
            model_id=model_id,
            sae_dir=Path(sae_dir),
            registration=registration,
            metrics=dict(summary or {}),
            tracking_uri=mlflow.get_tracking_uri(),
        )


# --- seeds of one recipe ------------------------------------------------------------------------------

TAG_RECIPE_HASH = lineage.TAG_RECIPE_HASH  # also copied onto the analyses of the SAE (lineage)
TAG_SEED = lineage.TAG_SEED
TAG_SEEDS = "sae_mlops.seeds"
TAG_PARENT_RUN = "mlflow.parentRunId"
KIND_SEEDS = "train_seeds"


def create_child_run(client: MlflowClient, parent_run_id: str, run_name: str | None) -> str:
    """A new RUNNING run nested under `parent_run_id` (tag ``mlflow.parentRunId``, the parent's experiment)."""
    from mlflow.tracking.context import registry as context_registry

    parent = client.get_run(parent_run_id)
    tags = context_registry.resolve_tags({TAG_PARENT_RUN: parent_run_id})
    run = client.create_run(parent.info.experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


class SeedsRun:
    """The parent run of ``train --seeds N``: one recipe (tag ``sae_mlops.recipe_hash``, params = the
    recipe without the seed), its seeds as child runs (:meth:`child`, each a :class:`SourceRun`
    tagged with the recipe hash and ``sae_mlops.seed``). :meth:`finish` logs, for every final
    training metric the seeds share, its mean and standard deviation over seeds (``<name>_seed_mean``,
    ``<name>_seed_std``, ddof = 1) and a description linking the children. Ends FINISHED, or FAILED
    when the block raises (a run from ``MLFLOW_RUN_ID`` is left to its owner)."""

    def __init__(self, recipe_hash: str, seeds: list[int], experiment: str | None = None, run_name: str | None = None):
        self.client = MlflowClient()
        self.recipe_hash = recipe_hash
        self.seeds = seeds
        self.run_id, self._owned = resolve_run(self.client, experiment, run_name)
        self.client.log_batch(self.run_id, tags=[
            RunTag(TAG_KIND, KIND_SEEDS), RunTag(TAG_RECIPE_HASH, recipe_hash),
            RunTag(TAG_SEEDS, ",".join(str(s) for s in seeds)),
            *(RunTag(k, str(v)) for k, v in lineage.code_version_tags().items() if v is not None),
        ])

    def __enter__(self) -> SeedsRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._owned:
            self.client.set_terminated(self.run_id, "FAILED" if exc_type else "FINISHED")

    def log_params(self, params: dict[str, Any]) -> None:
        given, _ = flat_params(params, self.client.get_run(self.run_id).data.params)
        self.client.log_batch(self.run_id, params=given)

    def child(self, kind: str, seed: int, run_name: str | None) -> SourceRun:
        run = SourceRun(kind, run_name=run_name, parent_run_id=self.run_id)
        run.set_tags({TAG_RECIPE_HASH: self.recipe_hash, TAG_SEED: seed})
        return run

    def finish(self, outcomes: list[SourceOutcome]) -> dict[str, float]:
        """Seed mean and std of each final metric every child has; the description; returns the metrics."""
        import numpy as np

        names = sorted(set.intersection(*(set(o.metrics) for o in outcomes))) if outcomes else []
        out: dict[str, float] = {}
        for name in names:
            vals = np.array([o.metrics[name] for o in outcomes], dtype=float)
            out[f"{name}_seed_mean"] = float(vals.mean())
            if vals.size >= 2:
                out[f"{name}_seed_std"] = float(vals.std(ddof=1))
        now = get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[Metric(metric_key(k), v, now, 0) for k, v in out.items()
                                                    if math.isfinite(v)])
        lines = [f"{len(outcomes)} seeds of recipe `{self.recipe_hash}` (child runs, tag `{TAG_RECIPE_HASH}`):", ""]
        for seed, o in zip(self.seeds, outcomes, strict=False):
            reg = f", registered {o.registration.name} v{o.registration.version}" if o.registration else ""
            lines.append(f"- seed {seed}: run `{o.run_id}`, logged model `{o.model_id}`{reg}")
        self.client.set_tag(self.run_id, "mlflow.note.content", "\n".join(lines))
        return out


# --- import ----------------------------------------------------------------------------------------


def history_metrics(history: dict[str, list[Any]]) -> list[tuple[int, dict[str, float]]]:
    """Per-epoch metrics from a prior-format history (see the module docstring for the names)."""
    by_epoch: dict[int, dict[str, float]] = {}
    for key, values in history.items():
        if not isinstance(values, list):
            continue
        name = HISTORY_NAMES.get(key, f"train/{key}")
        for epoch, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            by_epoch.setdefault(epoch, {})[name] = float(value)
    return sorted(by_epoch.items())


def import_sae(
    path: str | Path,
    *,
    register: str | None = None,
    alias: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
) -> SourceOutcome:
    """Make a source run + LoggedModel for the SAE directory `path` (prior format or SAELens), or
    return the existing run of the same SAE (same content hash; ``existing=True``)."""
    from sae_mlops.errors import InputError
    from sae_mlops.sources.sae import load_sae_directory
    from sae_mlops.tracking.registry import check_model_name

    check_model_name(register, alias)
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise InputError(f"SAE directory {path} does not exist; give a prior-format or SAELens SAE directory to import.")
    loaded = load_sae_directory(directory, device="cpu", source=str(path))
    info = loaded.info
    sae_hash = str(info.content_hash)
    client = MlflowClient()
    existing = lineage.find_source_by_hash(sae_hash, client)
    if existing is not None:
        run_id = existing.info.run_id
        model_id = existing.data.tags.get(TAG_LOGGED_MODEL_ID)
        registration = None
        if register and model_id:
            registration = register_sae_model(client, model_id, run_id, register, alias, tags=version_tags(sae_hash, info.architecture))
        elif existing.data.tags.get(TAG_REGISTERED_NAME):
            registration = Registration(
                existing.data.tags[TAG_REGISTERED_NAME], existing.data.tags.get(TAG_REGISTERED_VERSION, ""), None, False
            )
        log.info("SAE %s (hash %s) is already in MLflow: run %s", path, sae_hash[:12], run_id)
        return SourceOutcome(
            run_id=run_id,
            kind=existing.data.tags.get(TAG_KIND, "import"),
            sae_hash=sae_hash,
            model_id=model_id,
            sae_dir=directory,
            registration=registration,
            existing=True,
            tracking_uri=mlflow.get_tracking_uri(),
        )

    from sae_mlops.naming import run_title

    params = sae_params(info)
    title = run_title("import", directory.name, info.architecture, info.d_sae, params.get("k"))
    with SourceRun("import", experiment=experiment, run_name=run_name or title) as run:
        run.log_params({"source_path": str(directory.resolve()), **params})
        run.set_tags({"sae_mlops.source_path": str(directory.resolve()), "sae_mlops.sae_format": info.format})
        if info.history:
            for epoch, metrics in history_metrics(info.history):
                run.log_metrics(epoch, metrics)
        summary = import_summary(info, directory)
        return run.finish_with_sae(
            directory,
            sae_hash,
            model_params=params,
            architecture=info.architecture,
            summary=summary,
            register=register,
            alias=alias,
        )


def sae_params(info: Any) -> dict[str, Any]:
    """Params describing an SAE (from its SAEInfo)."""
    cfg_extra = {k: v for k, v in (info.extra or {}).items() if isinstance(v, (str, int, float, bool))}
    return {
        "sae_format": info.format,
        "architecture": info.architecture,
        "d_in": info.d_in,
        "d_sae": info.d_sae,
        "k": info.k if info.k is not None else (info.extra or {}).get("k"),
        "hook": info.hook_name,
        "hook_layer": info.hook_layer,
        "model": info.model_name,
        "context_size": info.context_size,
        "prepend_bos": info.prepend_bos,
        "dtype": info.dtype,
        **{f"sae_extra.{k}": v for k, v in cfg_extra.items()},
    }


def import_summary(info: Any, directory: Path) -> dict[str, float]:
    """Final training facts recorded with an imported SAE: last history values, dead features."""
    out: dict[str, float] = {}
    if info.history:
        epochs = history_metrics(info.history)
        if epochs:
            for k, v in epochs[-1][1].items():
                out[k.replace("train/", "train/final_", 1)] = v
    if info.ever_fired is not None:
        out["train/final_dead_features"] = float((~info.ever_fired.bool()).sum())
    meta = _saelens_metadata(directory)
    if meta:
        for key, name in (("l0", "train/final_l0"), ("num_dead_features", "train/final_dead_features")):
            if isinstance(meta.get(key), (int, float)):
                out.setdefault(name, float(meta[key]))
    return out


def _saelens_metadata(directory: Path) -> dict[str, Any]:
    """The ``metadata`` object of a SAELens ``cfg.json`` (end-of-training l0, dead features), or {}."""
    import json

    cfg = Path(directory) / "cfg.json"
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8")).get("metadata") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}
