"""Naming an analysis on the command line: a local output directory of `sae-mlops full`, an MLflow
run id, or ``runs:/<run_id>``. A run's artifacts are downloaded (with
:func:`sae_mlops.tracking.artifacts.download_analysis`) into a local directory first, so everything
after reads a directory."""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

RUNS_DIR = Path("analysis") / "runs"  # where dashboard and label keep a run's downloaded analysis
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class AnalysisRef:
    """An analysis named by the user: where its files are, and its MLflow run when known."""

    given: str
    root: Path
    run_id: str | None = None


def run_id_of(value: str) -> str | None:
    """The run id in ``runs:/<id>[/...]`` or a bare 32-hex run id; None for anything else."""
    v = value.strip()
    if v.startswith("runs:/"):
        return v[len("runs:/") :].strip("/").split("/", 1)[0] or None
    return v if _RUN_ID.match(v) else None


def resolve_analysis(
    value: str,
    *,
    activation_db: bool = False,
    download_to: str | Path | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> AnalysisRef:
    """Resolve ``value`` (directory, run id or ``runs:/<id>``) to a local analysis directory.

    A local directory wins over a run id of the same spelling. ``run_id`` names the MLflow run of a
    local directory (to log to it). A run is downloaded to ``download_to`` (default: a new
    temporary directory); the activation database only when ``activation_db``; its ``labels/``
    (from `sae-mlops label`) when there are any.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return AnalysisRef(given=value, root=path, run_id=run_id)
    rid = run_id_of(value)
    if rid is None:
        raise InputError(
            f"'{value}' is neither an analysis directory nor an MLflow run id; give the output directory of "
            "`sae-mlops full`, a run id or runs:/<run_id>."
        )
    from sae_mlops.tracking.artifacts import download_analysis
    from sae_mlops.tracking.features import download_labels

    dst = Path(download_to) if download_to else Path(tempfile.mkdtemp(prefix=f"sae-mlops-{rid[:8]}-"))
    root = download_analysis(rid, dst, tracking_uri, activation_db=activation_db)
    if download_labels(rid, root, tracking_uri):  # earlier labels: shown by dashboards, skipped by label
        log.info("downloaded the labels of run %s", rid)
    return AnalysisRef(given=value, root=root, run_id=rid)
