"""Load an SAE from whatever the user named, and describe it fully (SAEInfo).

Accepted forms of `source`, tried in this order:

1. an existing local directory: the prior tool's format (config.json + weights.pt) or SAELens
   (cfg.json + sae_weights.safetensors);
2. ``runs:/<run_id>/<path>``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``: downloaded
   through MLflow, then loaded as 1., with lineage tags;
3. a SAELens release: ``release:sae_id``, or ``source=release`` with `sae_id` given separately.

Anything else (another URI scheme, a path that does not exist) is an InputError naming the input.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sae_mlops.errors import InputError
from sae_mlops.sources.device import resolve_device
from sae_mlops.sources.hashing import sha256_directory, sha256_state_dict
from sae_mlops.sources.layout import LAYOUT_HINT, LEGACY, SAELENS, detect_layout, partial_layout
from sae_mlops.sources.types import LoadedSAE

logger = logging.getLogger(__name__)

URI_FORMS = "runs:/<run_id>/<path>, models:/<name>/<version> or models:/<name>@<alias>"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):/")

#: Turns a runs:/ or models:/ URI into (local SAE directory, lineage tags). Registered by the tracking
#: layer (`sae_mlops.tracking.resolve`) when it is imported: sources sit below tracking and never import
#: MLflow code, so the dependency is inverted here.
_URI_RESOLVER: list[Callable[[str], tuple[Path, dict[str, str]]]] = []


def register_uri_resolver(resolver: Callable[[str], tuple[Path, dict[str, str]]]) -> None:
    """Install the function that resolves MLflow URIs for :func:`load_sae` (the last one wins)."""
    _URI_RESOLVER[:] = [resolver]


def uri_scheme(value: str) -> str | None:
    """The scheme of a ``scheme:/...`` string ("runs", "s3", ...), or None when it is not one."""
    match = _SCHEME.match(value)
    return match.group(1).lower() if match else None


def resolve_mlflow_uri(uri: str) -> tuple[Path, dict[str, str]]:
    """The local directory and lineage tags for a runs:/ or models:/ URI (through the tracking layer)."""
    if not _URI_RESOLVER:
        raise InputError(
            f"SAE {uri} is an MLflow URI, which the tracking layer resolves; import sae_mlops.tracking.resolve "
            "first (the CLI, the entry points and sae_mlops.workflows do), or give a local directory."
        )
    return _URI_RESOLVER[0](uri)

FORMS_HINT = f"give a prior-format or SAELens directory, release:sae_id, {URI_FORMS}"

DIRECTORY = "directory"
MLFLOW = "mlflow"
RELEASE = "release"


@dataclass(frozen=True)
class SAESourceSpec:
    """What kind of source a user string names (no I/O beyond checking whether a path exists)."""

    kind: str  # "directory" | "mlflow" | "release"
    value: str  # the directory or URI; the release name for "release"
    sae_id: str | None = None


def classify_sae_source(source: str, sae_id: str | None = None) -> SAESourceSpec:
    """Decide how `source` (and `sae_id`) should be loaded, or raise InputError naming it."""
    if not source or not source.strip():
        raise InputError(f"No SAE was given; {FORMS_HINT}.")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"SAE path {source} is a file, not a directory; {FORMS_HINT}.")
        if sae_id is not None:
            raise InputError(f"SAE {source} is a local directory, so --sae-id {sae_id} does not apply; drop --sae-id.")
        return SAESourceSpec(DIRECTORY, str(path))
    scheme = uri_scheme(source)
    if scheme is not None:
        if scheme in ("runs", "models"):
            if sae_id is not None:
                raise InputError(f"SAE {source} is an MLflow URI, so --sae-id {sae_id} does not apply; drop --sae-id.")
            return SAESourceSpec(MLFLOW, source)
        raise InputError(f"SAE source {source} uses the unsupported URI scheme '{scheme}:'; {FORMS_HINT}.")
    if sae_id is not None:
        if ":" in source:
            raise InputError(
                f"SAE source {source} already names an SAE id; drop --sae-id {sae_id} or the ':<id>' part."
            )
        return SAESourceSpec(RELEASE, source, sae_id)
    if ":" in source and not source.startswith(("/", ".", "~")):
        release, _, release_id = source.partition(":")
        if release and release_id:
            return SAESourceSpec(RELEASE, release, release_id)
        raise InputError(f"SAE source {source} is neither a path nor release:sae_id; {FORMS_HINT}.")
    raise InputError(f"SAE path {source} does not exist; {FORMS_HINT}.")


def load_sae(
    source: str,
    sae_id: str | None = None,
    device: str = "cpu",
    topk_mode: str | None = None,
    threshold: float | None = None,
) -> LoadedSAE:
    """Load the SAE `source` names (see the module docstring) on `device` ("auto" allowed).

    topk_mode / threshold apply to the prior format's BatchTopK SAEs ("batch" by default); given for
    any other SAE they raise `InputError` (an option that does not apply is refused, not ignored).
    The returned SAEInfo carries the architecture, hook, dims, metadata, local path, content hash
    (sha256 over the SAE directory's files, or over the tensors for a hub release) and, for MLflow
    URIs, the lineage tags.
    """
    device = resolve_device(device)
    spec = classify_sae_source(source, sae_id)
    if spec.kind == RELEASE:
        _refuse_topk_options(source, "a SAELens release", topk_mode, threshold)
        return _load_release(spec, source, device)
    lineage: dict[str, str] = {}
    directory = Path(spec.value)
    if spec.kind == MLFLOW:
        directory, lineage = resolve_mlflow_uri(spec.value)
    loaded = load_sae_directory(directory, device=device, topk_mode=topk_mode, threshold=threshold, source=source)
    loaded.info.lineage.update(lineage)
    return loaded


def check_finite_weights(loaded: LoadedSAE, label: str) -> None:
    """`check_finite_tensors` over every floating tensor of the loaded SAE's state (W_enc, b_enc,
    W_dec, b_dec, threshold...)."""
    import torch

    from sae_mlops.sources.finite import check_finite_tensors

    module = loaded.module
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(module, torch.nn.Module):
        tensors = {k: v for k, v in module.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
    else:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            v = getattr(module, name, None)
            if torch.is_tensor(v) and v.is_floating_point():
                tensors[name] = v
    check_finite_tensors(tensors, loaded.info.d_sae, label)


def load_sae_directory(
    directory: Path,
    device: str = "cpu",
    topk_mode: str | None = None,
    threshold: float | None = None,
    source: str | None = None,
) -> LoadedSAE:
    """Load a local SAE directory in either format and hash its files."""
    label = source or str(directory)
    layout = detect_layout(directory) or partial_layout(directory)
    if layout == SAELENS:
        from sae_mlops.sources.saelens import load_saelens_dir

        _refuse_topk_options(label, "a SAELens SAE", topk_mode, threshold)
        loaded = load_saelens_dir(directory, device=device, source=label)
    elif layout == LEGACY:
        from sae_mlops.sources.legacy import load_legacy_sae

        loaded = load_legacy_sae(directory, device=device, topk_mode=topk_mode, threshold=threshold, source=label)
    else:
        raise InputError(f"SAE directory {label} holds neither SAE layout ({LAYOUT_HINT}); {FORMS_HINT}.")
    check_finite_weights(loaded, label)
    loaded.info.local_path = Path(directory).resolve()
    loaded.info.content_hash = sha256_directory(Path(directory))
    logger.info(
        "SAE %s: %s (%s), hook %s, d_in=%d, d_sae=%d",
        label,
        loaded.info.architecture,
        loaded.info.format,
        loaded.info.hook_name,
        loaded.info.d_in,
        loaded.info.d_sae,
    )
    return loaded


def _load_release(spec: SAESourceSpec, source: str, device: str) -> LoadedSAE:
    from sae_mlops.sources.saelens import load_saelens_release

    assert spec.sae_id is not None
    label = source if ":" in source else f"{spec.value}:{spec.sae_id}"
    loaded = load_saelens_release(spec.value, spec.sae_id, device=device, source=label)
    check_finite_weights(loaded, label)
    loaded.info.content_hash = sha256_state_dict(loaded.module.state_dict())  # type: ignore[attr-defined]  # a torch module
    return loaded


def _refuse_topk_options(label: str, what: str, topk_mode: str | None, threshold: float | None) -> None:
    if topk_mode is None and threshold is None:
        return
    given = " and ".join(o for o, v in (("--topk-mode", topk_mode), ("--threshold", threshold)) if v is not None)
    raise InputError(f"SAE {label} is {what}, so {given} does not apply; drop it (it is for prior-format BatchTopK SAEs only).")
