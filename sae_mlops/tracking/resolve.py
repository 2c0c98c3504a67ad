"""Resolve MLflow URIs naming an SAE into a local directory plus lineage tags.

Supported (against the current tracking URI: ``MLFLOW_TRACKING_URI`` or MLflow's default):

- ``runs:/<run_id>/<artifact_path>`` (or ``runs:/<run_id>`` for all of the run's artifacts);
- ``models:/<name>/<version>`` (``latest`` allowed) and ``models:/<name>@<alias>``;
- ``models:/<logged_model_id>`` (an MLflow 3 LoggedModel, ``m-...``).

The artifacts are downloaded (``mlflow.artifacts.download_artifacts``) to a fresh temporary directory
(or `dst_dir`), then the SAE directory inside is found: the download itself, or the one directory
below it holding ``cfg.json + sae_weights.safetensors`` (SAELens) or ``config.json + weights.pt``
(prior format).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_mlops.errors import InputError
from sae_mlops.sources.layout import LAYOUT_HINT, detect_layout
from sae_mlops.sources.sae import URI_FORMS, register_uri_resolver, uri_scheme

logger = logging.getLogger(__name__)

TAG_SOURCE_URI = "sae_mlops.source_uri"
TAG_SOURCE_RUN_ID = "sae_mlops.source_run_id"
TAG_SOURCE_MODEL_NAME = "sae_mlops.source_model_name"
TAG_SOURCE_MODEL_VERSION = "sae_mlops.source_model_version"
TAG_SOURCE_MODEL_ALIAS = "sae_mlops.source_model_alias"
TAG_SOURCE_LOGGED_MODEL_ID = "sae_mlops.source_logged_model_id"
LINEAGE_TAGS = (
    TAG_SOURCE_URI,
    TAG_SOURCE_RUN_ID,
    TAG_SOURCE_MODEL_NAME,
    TAG_SOURCE_MODEL_VERSION,
    TAG_SOURCE_MODEL_ALIAS,
    TAG_SOURCE_LOGGED_MODEL_ID,
)

MLFLOW_SCHEMES = ("runs", "models")
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{8,}$")
_MAX_SEARCH_DEPTH = 4


@dataclass
class ResolvedSAESource:
    """An MLflow URI resolved to a local SAE directory."""

    uri: str
    local_path: Path  # the SAE directory (inside download_dir)
    download_dir: Path  # where the artifacts were downloaded; the caller may delete it when done
    lineage: dict[str, str] = field(default_factory=dict)




def is_mlflow_uri(value: str) -> bool:
    """Whether `value` is a runs:/ or models:/ URI."""
    return uri_scheme(value) in MLFLOW_SCHEMES


def resolve_mlflow_uri(uri: str, dst_dir: str | Path | None = None) -> ResolvedSAESource:
    """Download the SAE named by a runs:/ or models:/ URI; return its local directory and lineage tags."""
    scheme = uri_scheme(uri)
    if scheme not in MLFLOW_SCHEMES:
        raise InputError(
            f"SAE URI {uri} has an unsupported scheme {scheme!r}; give {URI_FORMS} (or a local directory)."
        )
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if scheme == "runs":
        download_uri, lineage = _resolve_run(client, uri)
    else:
        download_uri, lineage = _resolve_model(client, uri)
    lineage = {TAG_SOURCE_URI: uri, **{k: str(v) for k, v in lineage.items() if v not in (None, "")}}
    target = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="sae_mlops_mlflow_"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        sae_dir = find_sae_dir(_download(download_uri, target, uri), uri)
    except InputError:
        if dst_dir is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    logger.info("resolved %s to %s", uri, sae_dir)
    return ResolvedSAESource(uri=uri, local_path=sae_dir, download_dir=target, lineage={k: str(v) for k, v in lineage.items()})


def find_sae_dir(root: Path, label: str) -> Path:
    """`root` if it is an SAE directory, else the single SAE directory below it (InputError otherwise)."""
    if root.is_dir() and detect_layout(root):
        return root
    found = [path for path in _walk_dirs(root, _MAX_SEARCH_DEPTH) if detect_layout(path)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(
            f"The artifacts of {label} hold no SAE files ({LAYOUT_HINT}); point the URI at an SAE directory."
        )
    listed = ", ".join(sorted(p.relative_to(root).as_posix() for p in found)[:5])
    raise InputError(
        f"The artifacts of {label} hold several SAE directories ({listed}); add the one you mean to the URI path."
    )


def _walk_dirs(root: Path, depth: int) -> list[Path]:
    if depth == 0 or not root.is_dir():
        return []
    out: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            out.append(child)
            out.extend(_walk_dirs(child, depth - 1))
    return out


def _resolve_run(client: Any, uri: str) -> tuple[str, dict[str, str | None]]:
    body = uri.split(":/", 1)[1].lstrip("/")
    run_id, _, artifact_path = body.partition("/")
    if not run_id:
        raise InputError(f"SAE URI {uri} names no run; give runs:/<run_id>/<artifact_path>.")
    call_mlflow(
        lambda: client.get_run(run_id),
        f"MLflow run {run_id} (from {uri}) does not exist in the tracking store {_tracking_uri()}; check the run id and MLFLOW_TRACKING_URI.",
    )
    return f"runs:/{run_id}/{artifact_path}", {TAG_SOURCE_RUN_ID: run_id}


def _resolve_model(client: Any, uri: str) -> tuple[str, dict[str, str | None]]:
    body = uri.split(":/", 1)[1].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        _check_registered_model(client, name, uri)
        version = call_mlflow(
            lambda: client.get_model_version_by_alias(name, alias),
            f"Registered model {name} has no alias {alias!r} (from {uri}); check the alias or use models:/{name}/<version>.",
        )
        return f"models:/{name}/{version.version}", {**_version_lineage(version), TAG_SOURCE_MODEL_ALIAS: alias}
    if "/" in body:
        name, version_str = body.rsplit("/", 1)
        _check_registered_model(client, name, uri)
        version_str = _resolve_version(client, name, version_str, uri)
        version = call_mlflow(
            lambda: client.get_model_version(name, version_str),
            f"Registered model {name} has no version {version_str} (from {uri}); check the version number.",
        )
        return f"models:/{name}/{version.version}", _version_lineage(version)
    if _LOGGED_MODEL_ID.match(body):
        logged = call_mlflow(
            lambda: client.get_logged_model(body),
            f"MLflow logged model {body} (from {uri}) does not exist in {_tracking_uri()}; check the model id.",
        )
        return f"models:/{body}", {TAG_SOURCE_LOGGED_MODEL_ID: body, TAG_SOURCE_RUN_ID: logged.source_run_id}
    raise InputError(
        f"SAE URI {uri} names no version or alias; give models:/{body}/<version> or models:/{body}@<alias>."
    )


def _check_registered_model(client: Any, name: str, uri: str) -> None:
    call_mlflow(
        lambda: client.get_registered_model(name),
        f"Registered model {name!r} (from {uri}) does not exist in {_tracking_uri()}; check the name and MLFLOW_TRACKING_URI.",
    )


def _resolve_version(client: Any, name: str, version: str, uri: str) -> str:
    if version.lower() == "latest":
        versions = call_mlflow(
            lambda: client.search_model_versions(f"name='{name}'"),
            f"Could not list the versions of model {name} ({uri}).",
        )
        if not versions:
            raise InputError(f"Registered model {name} has no versions (from {uri}); register a version first.")
        return str(max(int(v.version) for v in versions))
    if not version.isdigit():
        raise InputError(
            f"Model version {version!r} in {uri} is not a number; give models:/{name}/<version> or models:/{name}@<alias>."
        )
    return version


def _version_lineage(version: Any) -> dict[str, str | None]:
    logged_model_id = getattr(version, "model_id", None)
    source = getattr(version, "source", "") or ""
    if not logged_model_id and source.startswith("models:/"):
        candidate = source[len("models:/") :].strip("/")
        if _LOGGED_MODEL_ID.match(candidate):
            logged_model_id = candidate
    return {
        TAG_SOURCE_MODEL_NAME: version.name,
        TAG_SOURCE_MODEL_VERSION: str(version.version),
        TAG_SOURCE_RUN_ID: version.run_id,
        TAG_SOURCE_LOGGED_MODEL_ID: logged_model_id,
    }


def _download(download_uri: str, target: Path, uri: str) -> Path:
    import mlflow

    path = call_mlflow(
        lambda: mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=str(target)),
        f"The artifacts of {uri} could not be downloaded (no such artifact path?); check the path after the run id.",
    )
    return Path(path)


def call_mlflow(func: Any, message: str) -> Any:
    """Run an MLflow call; a missing resource or a bad parameter becomes InputError(message)."""
    from mlflow.exceptions import MlflowException

    try:
        return func()
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise InputError(message) from None
        raise InputError(f"{message.split(';')[0]}: MLflow said {exc.message}.") from None
    except OSError as exc:
        raise InputError(
            f"{message.split(';')[0]}: the tracking store {_tracking_uri()} could not be reached ({exc})."
        ) from None


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _resolve_for_sources(uri: str) -> tuple[Path, dict[str, str]]:
    resolved = resolve_mlflow_uri(uri)
    return resolved.local_path, resolved.lineage


# `sae_mlops.sources.load_sae` resolves runs:/ and models:/ URIs through this layer (it cannot import
# MLflow code itself: sources sit below tracking).
register_uri_resolver(_resolve_for_sources)
