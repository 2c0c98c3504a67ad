"""`sae-mlops report` end to end: the notebook executes top to bottom on a demo full analysis (papermill,
this interpreter as the kernel), the HTML holds every section and the figures, and the executed
notebook and HTML are logged to the analysis's MLflow run (a real sqlite store). Missing artifacts
stop early with a message naming `sae-mlops full`.

The full analysis (8000 tokens) and the report by run id are made once per module.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.errors import InputError
from sae_mlops.interp.notebook_report import ReportError, execute_notebook, generate_report, parse_features

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 8000
SECTIONS = ("Feature statistics", "Token density", "Feature deep dives", "Co-occurrence", "High co-occurrence clusters", "Cluster deep dive", "Position-0 features")
MIN_FIGURES = 12
runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store_at):
    with mlflow_store_at(tmp_path_factory.mktemp("report_store")) as uri:
        yield uri


@pytest.fixture(scope="module")
def full_analysis(tmp_path_factory):
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path, ensure_demo_assets
    from sae_mlops.analyses.full import run_full

    ensure_demo_assets()
    out = tmp_path_factory.mktemp("report_full") / "out"
    cfg = AnalysisConfig(sae=str(demo_sae_path("batchtopk")), model="demo", max_tokens=MAX_TOKENS, progress=False)
    return run_full(cfg, out)


@pytest.fixture(scope="module")
def logged(store, full_analysis):
    from sae_mlops.tracking.runs import log_analysis

    return log_analysis(full_analysis.result, full_analysis.files, full_analysis.out_dir, experiment="report-test")


@pytest.fixture(scope="module")
def by_run(store, logged, tmp_path_factory):
    return generate_report(run_id=logged, out_dir=tmp_path_factory.mktemp("report_out"))


def _html(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_notebook_runs_top_to_bottom_with_sections_and_figures(by_run):
    assert by_run.notebook.is_file() and by_run.html.is_file()
    nb = nbformat.read(str(by_run.notebook), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)  # every cell ran
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not [o.text for c in code for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]  # no warnings
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in code)
    html = _html(by_run.html)
    headings = re.findall(r"<h2[^>]*>(.*?)<", html) + re.findall(r"<h3[^>]*>(.*?)<", html)
    for section in SECTIONS:
        assert section in headings, (section, headings)
    assert html.count("data:image/png;base64,") >= MIN_FIGURES
    assert len(re.findall(r'<img[^>]+src="data:image/png', html)) >= MIN_FIGURES
    assert "<mark" in html  # highlighted contexts
    assert "Decoder norms" in html and "PCA of decoder rows" in html  # the demo SAE still loads


def test_report_is_logged_to_the_analysis_run(by_run, logged, store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    assert by_run.run_id == logged
    names = {Path(a.path).name for a in client.list_artifacts(logged, "report")}
    assert by_run.notebook.name in names and by_run.html.name in names
    tags = client.get_run(logged).data.tags
    assert tags["sae_mlops.report"] == f"report/{by_run.notebook.name}"
    assert tags["sae_mlops.report_html"] == f"report/{by_run.html.name}"
    assert tags["sae_mlops.kind"] == "full"  # the analysis run's own tags untouched
    # what the report downloaded: results and matrices, not the activation database
    downloaded = by_run.analysis_dir
    assert any((downloaded / "results").glob("feature_summaries.jsonl"))
    assert any((downloaded / "matrices").glob("*.npy"))
    assert not (downloaded / "activation_database").exists()


def test_cli_report_on_a_directory_with_chosen_features_and_no_dense_matrices(full_analysis, tmp_path):
    # As for d_sae above the dense limit: only the neighbour lists are there, and no decoder.
    src = tmp_path / "analysis"
    for sub in ("results", "matrices"):
        shutil.copytree(full_analysis.out_dir / sub, src / sub)
    for npy in (src / "matrices").glob("*.npy"):
        npy.unlink()
    out = tmp_path / "rep"
    r = runner.invoke(app, ["report", "--analysis-dir", str(src), "--features", "1,2", "--out", str(out), "--no-decoder", "-q"])
    assert r.exit_code == 0, r.output
    htmls = list(out.glob("interp_analysis*.html"))
    assert [h.name for h in htmls] == ["interp_analysis.html"] and (out / "interp_analysis.ipynb").is_file()
    html = _html(htmls[0])
    assert re.search(r"<h3[^>]*>Feature 1: ", html) and re.search(r"<h3[^>]*>Feature 2: ", html)
    assert "no (neighbour lists only)" in html
    assert "Decoder norms and PCA skipped" in html
    assert html.count("data:image/png;base64,") >= MIN_FIGURES - 2
    assert "Logged to MLflow" not in r.output  # a directory: nothing to log to


def test_missing_artifacts_name_the_full_analysis(store, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.create_experiment("report-missing")
    quick = client.create_run(exp, tags={"sae_mlops.kind": "quick"}).info.run_id
    (tmp_path / "r.json").write_text("{}")
    client.log_artifact(quick, str(tmp_path / "r.json"), artifact_path="results")
    with pytest.raises(InputError, match=r"no feature summaries.*a quick analysis.*sae-mlops full"):
        generate_report(run_id=quick, out_dir=tmp_path / "o")
    other = client.create_run(exp).info.run_id
    with pytest.raises(InputError, match=r"not an sae-mlops analysis run.*sae-mlops full"):
        generate_report(run_id=other, out_dir=tmp_path / "o")
    with pytest.raises(InputError, match="no MLflow run"):
        generate_report(run_id="0" * 32, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.ipynb"))

    r = runner.invoke(app, ["report", "--run-id", quick, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "sae-mlops full" in r.stderr and "Traceback" not in r.output
    (tmp_path / "q" / "results").mkdir(parents=True)
    (tmp_path / "q" / "results" / "analysis_results_20240101_000000.json").write_text("{}")
    r = runner.invoke(app, ["report", "--analysis-dir", str(tmp_path / "q")])
    assert r.exit_code == 2 and "quick analysis" in r.stderr and "sae-mlops full" in r.stderr
    r = runner.invoke(app, ["report"])
    assert r.exit_code == 2 and "--run-id" in r.stderr


def test_failing_cell_is_a_report_error_and_keeps_the_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}, "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell("import sys\nassert sys.executable == %r\nraise ValueError(f'boom {x}')" % sys.executable)]
    src = tmp_path / "bad.ipynb"
    nbformat.write(nb, str(src))
    with pytest.raises(ReportError, match=r"ValueError: boom 2"):
        execute_notebook(src, tmp_path / "out" / "bad_run.ipynb", {"x": 2}, cwd=tmp_path)
    assert (tmp_path / "out" / "bad_run.failed.ipynb").is_file()
    assert not (tmp_path / "out" / "bad_run.ipynb").exists()


def test_parse_features():
    assert parse_features(None) == [] and parse_features(" ") == []
    assert parse_features("3, 17,42") == [3, 17, 42]
    with pytest.raises(InputError, match="comma-separated"):
        parse_features("a,b")
    with pytest.raises(InputError, match="negative"):
        parse_features("-1")


def test_report_entry_point_matches_mlproject(tmp_path):
    import importlib.util

    import yaml
    from mlflow.projects import _project_spec

    spec = importlib.util.spec_from_file_location("entrypoint_report", ROOT / "entrypoints" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ep = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["report"]
    parser = mod.build_parser()
    accepted = {a.dest for a in parser._actions if a.option_strings} - {"help", "verbose"}
    assert accepted == set(ep["parameters"])
    cmd = _project_spec.load_project(str(ROOT)).get_entry_point("report").compute_command({"run_id": "abc"}, storage_dir=None)
    args = parser.parse_args(shlex.split(cmd)[2:])
    assert args.run_id == "abc" and args.analysis_dir is None and args.features is None and args.top1_threshold is None
    # a user mistake: exit code 2, no notebook run
    assert mod.main(["--analysis-dir", str(tmp_path / "missing")]) == 2
    assert mod.main([]) == 2
