"""The documentation site: its reference pages are current (generated from the code), the check fails on drift,
the site builds strictly, and the README stays one screen that links into it."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference_test", ROOT / "scripts" / "gen_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_generated_pages_are_current_and_the_catalogue_is_complete():
    generated, problems = _gen().pages()
    assert problems == []
    for path, text in generated.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(ROOT)} is stale: run make docs"


def test_the_check_fails_on_a_stale_page(tmp_path):
    gen = _gen()
    for name in ("options.md", "metrics.md", "troubleshooting.md"):
        shutil.copy(ROOT / "docs" / "reference" / name, tmp_path / name)
    assert gen.main(["--check", "--dir", str(tmp_path)]) == 0
    metrics = (tmp_path / "metrics.md").read_text(encoding="utf-8")
    (tmp_path / "metrics.md").write_text(metrics.replace("| `recon/cosine` |", "| `recon/cosine_old` |"), encoding="utf-8")
    assert gen.main(["--check", "--dir", str(tmp_path)]) == 1
    assert gen.main(["--dir", str(tmp_path)]) == 0  # regenerates
    assert (tmp_path / "metrics.md").read_text(encoding="utf-8") == metrics


def test_every_registry_metric_has_a_row():
    from sae_mlops.metrics import METRICS

    page = (ROOT / "docs" / "reference" / "metrics.md").read_text(encoding="utf-8")
    for m in METRICS:
        assert f"| `{m.name}` | {m.label.replace('|', chr(92) + '|')} |" in page, m.name


def test_a_case_without_its_message_is_a_problem(tmp_path, monkeypatch):
    gen = _gen()
    fixes = (ROOT / "tests" / "bad_inputs_fixes.yaml").read_text(encoding="utf-8")
    short = tmp_path / "fixes.yaml"
    short.write_text(fixes.replace("quick-sae-missing:", "quick-sae-gone:", 1), encoding="utf-8")
    monkeypatch.setattr(gen, "FIXES", short)
    _, problems = gen.render_troubleshooting()
    assert any("no entry for case quick-sae-missing" in p for p in problems)
    assert any("quick-sae-gone, which is not a case" in p for p in problems)


def test_the_site_builds_strictly(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "options" / "index.html").is_file()


def test_the_readme_is_one_screen_that_links_into_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in ("guides/compare.md", "guides/evals.md", "guides/synth.md", "guides/testing.md"):
        assert page in nav and (ROOT / "docs" / page).is_file()
