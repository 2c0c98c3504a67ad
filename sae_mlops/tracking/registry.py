"""SAEs as MLflow 3 logged models and registered model versions.

An SAE directory (SAELens: ``cfg.json`` + ``sae_weights.safetensors`` [+ ``sparsity.safetensors``,
``runner_cfg.json``]; prior format: ``config.json`` + ``weights.pt`` [+ ``history.json``]) is logged
as a *LoggedModel* of ``model_type="sae"`` whose artifacts are exactly the directory's files
(``create_logged_model`` + ``log_model_artifacts`` + ``finalize_logged_model``): no MLmodel flavor,
no pickle, nothing added, so the files downloaded back through ``models:/<name>@<alias>``,
``models:/<name>/<version>`` or ``models:/m-<id>`` hash to the same ``sae_mlops.sae_hash`` and
`sae_mlops.sources.load_sae` reads them like any local SAE directory.

The logged model is named after the SAE (`sae_mlops.naming.model_name`) and is an *output* of its
training/import run (``log_outputs``), so the run page lists it and its page links the run.

Registration: ``mlflow.register_model("models:/<logged model id>", name, tags=...)``, which also
records the version on the logged model (tag ``mlflow.modelVersions``: its page shows the version
instead of "Not registered"), plus an optional alias; the version is tagged with the SAE hash and
architecture, and the source run with the registered name and version.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sae_mlops.errors import InputError
from sae_mlops.tracking.lineage import (
    MODEL_TYPE,
    TAG_LOGGED_MODEL_ID,
    TAG_REGISTERED_NAME,
    TAG_REGISTERED_VERSION,
    TAG_SAE_HASH,
    model_id_of_version,
    quote,
)

log = logging.getLogger(__name__)

MODEL_NAME = "sae"
_ALIAS_OK = "letters, digits, '_' and '-'"


@dataclass
class Registration:
    name: str
    version: str
    alias: str | None = None
    created: bool = True  # False when the logged model was already that version


def log_sae_model(
    client: MlflowClient,
    run_id: str,
    sae_dir: Path,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    name: str = MODEL_NAME,
) -> str:
    """Log the files of `sae_dir` as a LoggedModel of run `run_id`; return its id (``m-...``)."""
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params={str(k): _short(v) for k, v in params.items() if v is not None},
        tags={str(k): str(v) for k, v in tags.items()},
        model_type=MODEL_TYPE,
    )
    try:
        client.log_model_artifacts(model.model_id, str(sae_dir))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    client.set_tag(run_id, TAG_LOGGED_MODEL_ID, model.model_id)
    log.info("Logged model %s (%s) from run %s", model.model_id, model.model_uri, run_id)
    return model.model_id


#: characters MLflow refuses in a registered model's name (its logged-model rule, applied when a
#: version is registered from ``models:/m-...``); the prior tool's directory names hold dots
_BAD_NAME_CHARS = ("/", ":", ".", "%", '"', "'")


def valid_model_name(name: str) -> str:
    """`name` with each run of characters MLflow refuses in a registered model name (``/ : . % " '``)
    replaced by one ``-``: ``gpt2.blocks.1.hook_resid_post.std_l1_3e-3`` ->
    ``gpt2-blocks-1-hook_resid_post-std_l1_3e-3``."""
    return re.sub("[" + re.escape("".join(_BAD_NAME_CHARS)) + "]+", "-", name).strip("-") or "sae"


def check_model_name(name: str | None, alias: str | None) -> None:
    """InputError for an alias without a name, or a malformed alias (before any heavy work). A name
    holding characters MLflow refuses is registered as `valid_model_name` (said in a warning)."""
    if alias and not name:
        raise InputError(f"--alias {alias} needs --register NAME (an alias belongs to a registered model).")
    if name is not None and not name.strip():
        raise InputError("--register needs a model name; give --register NAME.")
    if name is not None:
        from mlflow.utils.validation import _validate_model_name

        try:
            _validate_model_name(valid_model_name(name))
        except MlflowException as exc:
            raise InputError(f"--register {name!r} is not a valid model name ({exc.message}); use e.g. demo-sae.") from None
    if alias is not None:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", alias) or re.fullmatch(r"[vV]\d+|latest", alias):
            raise InputError(f"alias {alias!r} is not valid; use {_ALIAS_OK}, not 'latest' or 'v<number>'.")


def register_sae_model(
    client: MlflowClient,
    model_id: str,
    run_id: str,
    name: str,
    alias: str | None = None,
    tags: dict[str, str] | None = None,
) -> Registration:
    """Register logged model `model_id` as a version of `name` (reusing an existing version made from
    the same logged model), set `alias` on it, and tag the source run with name and version. A name
    MLflow refuses is registered as `valid_model_name` (a warning says which)."""
    valid = valid_model_name(name)
    if valid != name:
        log.warning("MLflow model names cannot contain %s; registering %r as %r", " ".join(_BAD_NAME_CHARS), name, valid)
        name = valid
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="SAEs logged by sae-mlops (model_type=sae).")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently
    existing = [
        v for v in client.search_model_versions(f"name = {quote(name)}") if model_id_of_version(v) == model_id
    ]
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        created = False
        log.info("Logged model %s is already %s version %s", model_id, name, version.version)
    else:
        import mlflow

        # the global tracking URI: the one every caller's client uses (MlflowClient() without arguments)
        version = mlflow.register_model(f"models:/{model_id}", name, tags={str(k): str(v) for k, v in (tags or {}).items()})
        created = True
        log.info("Registered %s version %s (logged model %s)", name, version.version, model_id)
    v = str(version.version)
    if alias:
        client.set_registered_model_alias(name, alias, v)
    client.set_tag(run_id, TAG_REGISTERED_NAME, name)
    client.set_tag(run_id, TAG_REGISTERED_VERSION, v)
    return Registration(name=name, version=v, alias=alias, created=created)


def version_tags(sae_hash: str | None, architecture: str | None) -> dict[str, str]:
    out = {}
    if sae_hash:
        out[TAG_SAE_HASH] = sae_hash
    if architecture:
        out["sae_mlops.architecture"] = architecture
    return out


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5990] + "..."
