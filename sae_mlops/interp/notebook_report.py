"""The interpretation report: execute ``notebooks/interp_analysis.ipynb`` on one full analysis with
papermill, render it as a self-contained HTML page (images embedded) with nbconvert, and log both to
the analysis's MLflow run.

The kernel is the Python running this code (``sys.executable -m ipykernel_launcher``), whatever
kernelspecs are installed, so the notebook always sees the same ``sae_mlops`` as the caller; pass
``kernel_name`` to use a named Jupyter kernel instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_mlops.errors import InputError
from sae_mlops.interp.data import require_full_analysis
from sae_mlops.files import atomic_write_text

log = logging.getLogger(__name__)

NOTEBOOK_NAME = "interp_analysis.ipynb"
NOTEBOOK_ENV = "SAE_MLOPS_NOTEBOOK"
REPORTS_DIR = Path("analysis") / "reports"
TAG_CREATED = "sae_mlops.report_created_at"  # UTC time the report was made (not in its file names)


class ReportError(RuntimeError):
    """The notebook failed while executing (the partial notebook is kept for inspection)."""


@dataclass
class ReportOutputs:
    notebook: Path  # the executed notebook
    html: Path  # its HTML rendering
    analysis_dir: Path  # the analysis it was run on
    run_id: str | None = None  # the MLflow run the report was logged to
    artifacts: list[str] = field(default_factory=list)  # artifact paths logged


def default_notebook() -> Path:
    """``$SAE_MLOPS_NOTEBOOK``, else ``notebooks/interp_analysis.ipynb`` of this source tree, else of
    the working directory (the MLflow project directory under ``mlflow run``)."""
    if os.environ.get(NOTEBOOK_ENV):
        return Path(os.environ[NOTEBOOK_ENV])
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        p = base / "notebooks" / NOTEBOOK_NAME
        if p.is_file():
            return p
    raise InputError(f"cannot find notebooks/{NOTEBOOK_NAME}; run from the sae-mlops source tree or set {NOTEBOOK_ENV} to the notebook's path.")


def parse_features(text: str | None) -> list[int]:
    """``"1, 2,3"`` -> ``[1, 2, 3]``; empty -> ``[]``."""
    if not text or not text.strip():
        return []
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--features must be comma-separated feature indices such as 3,17,42; got '{text}'.") from None
    if any(f < 0 for f in out):
        raise InputError(f"feature indices are never negative; got '{text}'.")
    return out


def check_features(features: list[int] | None, summaries: Path) -> list[int]:
    """`features` without repeats (first order kept); `InputError` naming the indices out of range of
    the analysed SAE (d_sae = the lines of its feature summaries), before the notebook runs."""
    if not features:
        return []
    unique = list(dict.fromkeys(int(f) for f in features))
    with open(summaries, encoding="utf-8") as fh:
        d_sae = sum(1 for line in fh if line.strip())
    bad = [f for f in unique if f >= d_sae]
    if bad:
        raise InputError(f"--features {','.join(map(str, bad))} out of range: this SAE has features 0..{d_sae - 1}; "
                         f"give indices below {d_sae}.")
    return unique


def current_python_kernel_manager():
    """A jupyter_client kernel manager class whose kernel is ``sys.executable`` (this venv)."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    class CurrentPythonKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> KernelSpec:
            if self._kernel_spec is None:
                self._kernel_spec = KernelSpec(
                    # the kernel's own log (transport notices, the interrupt at shutdown) is noise here:
                    # cell errors reach us through papermill
                    argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--IPKernelApp.log_level=CRITICAL"],
                    display_name=f"Python ({sys.executable})",
                    language="python",
                    resource_dir="",
                    metadata={"debugger": False},
                )
            return self._kernel_spec

    return CurrentPythonKernelManager


def execute_notebook(
    notebook: Path,
    output: Path,
    parameters: dict[str, Any],
    cwd: Path,
    kernel_name: str | None = None,
    timeout: int | None = 1800,
) -> Path:
    """Run ``notebook`` top to bottom with ``parameters`` (papermill); the executed notebook is
    written to ``output``. On a failing cell: ReportError naming the cell, the notebook kept as
    ``<output stem>.failed.ipynb``."""
    try:
        import papermill as pm
        from papermill.exceptions import PapermillExecutionError
    except ImportError as e:
        raise InputError(f"papermill is not installed ({e}); run `make install` (or pip install -r requirements-lock.txt -e .).") from e
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial.ipynb")
    extra: dict[str, Any] = {} if kernel_name else {"kernel_manager_class": current_python_kernel_manager()}
    log.info("executing %s (kernel: %s)", notebook, kernel_name or sys.executable)
    try:
        pm.execute_notebook(
            str(notebook),
            str(partial),
            parameters=parameters,
            kernel_name=kernel_name,
            cwd=str(cwd),
            progress_bar=False,
            log_output=False,
            execution_timeout=timeout,
            **extra,
        )
    except PapermillExecutionError as e:
        failed = output.with_name(f"{output.stem}.failed.ipynb")
        if partial.exists():
            os.replace(partial, failed)
        raise ReportError(f"the notebook failed in cell {e.exec_count}: {e.ename}: {e.evalue} (executed notebook kept at {failed}).") from e
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    return output


def notebook_to_html(notebook: Path, html: Path, show_code: bool = False) -> Path:
    """Render an executed notebook as one self-contained HTML file (figures embedded as base64,
    each with the alt text its output recorded). Code cells are left out (readers want the results)
    unless `show_code`; their outputs and the markdown cells stay."""
    import nbformat
    from bs4 import BeautifulSoup
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    alts: dict[str, str] = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            png, alt = out.get("data", {}).get("image/png"), out.get("metadata", {}).get("image/png", {}).get("alt")
            if png and alt:
                alts[png.strip()[:256]] = alt
    quiet = logging.getLogger(f"{__name__}.nbconvert")  # the lab template drops alt text; we put it back below
    quiet.setLevel(logging.ERROR)
    body, _ = HTMLExporter(embed_images=True, exclude_input=not show_code, exclude_input_prompt=not show_code,
                           exclude_output_prompt=not show_code, log=quiet).from_notebook_node(nb)
    soup = BeautifulSoup(body, features="html.parser")
    prefix = "data:image/png;base64,"
    for img in soup.find_all("img"):
        src = str(img.get("src") or "")
        if src.startswith(prefix) and src[len(prefix) :].strip()[:256] in alts:
            img["alt"] = alts[src[len(prefix) :].strip()[:256]]
    return atomic_write_text(html, str(soup))


def generate_report(
    run_id: str | None = None,
    analysis_dir: str | Path | None = None,
    features: list[int] | None = None,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    parameters: dict[str, Any] | None = None,
    notebook: str | Path | None = None,
    kernel_name: str | None = None,
    log_to_run: bool = True,
    extra_log_run: str | None = None,
    timeout: int | None = 1800,
    show_code: bool = False,
) -> ReportOutputs:
    """Execute the interpretation notebook on one full analysis and write ``interp_analysis.ipynb``
    and ``interp_analysis.html`` under ``out_dir`` (stable names, so reports of several runs compare in
    MLflow; when it was made is the tag ``sae_mlops.report_created_at``). The HTML hides the code
    cells unless `show_code`.

    run_id: an MLflow run of ``sae-mlops full``: its artifacts are downloaded to ``out_dir/artifacts``
        (unless ``analysis_dir`` is given too) and the report is logged to it under ``report/``.
    analysis_dir: a local full-analysis directory (the ``--out`` of ``sae-mlops full``).
    out_dir: default ``<analysis_dir>/report`` for a directory, ``analysis/reports/<run_id>`` for a run.
    parameters: further notebook parameters (thresholds...; see the notebook's parameters cell).
    extra_log_run: another run to log the report to as well (the run ``mlflow run -e report`` made).
    Missing inputs (no feature summaries...) raise InputError before anything is executed.
    """
    if not run_id and not analysis_dir:
        raise InputError("name the analysis to report on: --run-id RUN_ID (an MLflow run of `sae-mlops full`) or --analysis-dir DIR.")
    nb_path = Path(notebook) if notebook else default_notebook()
    if not nb_path.is_file():
        raise InputError(f"notebook '{nb_path}' does not exist.")
    if run_id:
        from sae_mlops.tracking.artifacts import check_analysis_run, download_analysis

        check_analysis_run(run_id, tracking_uri)
    out = Path(out_dir) if out_dir else (Path(analysis_dir) / "report" if analysis_dir else REPORTS_DIR / str(run_id))
    out = out.expanduser().resolve()
    if analysis_dir:
        adir = Path(analysis_dir).expanduser().resolve()
    else:
        adir = download_analysis(str(run_id), out / "artifacts", tracking_uri)
    summaries = require_full_analysis(adir)
    features = check_features(features, summaries)

    params: dict[str, Any] = {
        "run_id": run_id or "",
        "analysis_dir": str(adir),
        "tracking_uri": tracking_uri or "",
        "feature_ids": [int(f) for f in (features or [])],
    }
    params.update(parameters or {})
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    nb_out = execute_notebook(nb_path, out / "interp_analysis.ipynb", params, cwd=out, kernel_name=kernel_name, timeout=timeout)
    html = notebook_to_html(nb_out, out / "interp_analysis.html", show_code=show_code)
    log.info("report written: %s and %s", nb_out, html)
    result = ReportOutputs(notebook=nb_out, html=html, analysis_dir=adir)
    if log_to_run and run_id:
        from sae_mlops.tracking.artifacts import log_report

        result.artifacts = log_report(run_id, [nb_out, html], tracking_uri, tags={TAG_CREATED: created})
        result.run_id = run_id
    if extra_log_run and extra_log_run != run_id:
        from sae_mlops.tracking.artifacts import TAG_REPORT_OF, log_report

        extra_tags = {TAG_REPORT_OF: run_id} if run_id else {"sae_mlops.report_of_dir": str(adir)}
        log_report(extra_log_run, [nb_out, html], tracking_uri, tags={**extra_tags, TAG_CREATED: created})
        result.run_id = result.run_id or extra_log_run
    return result
