"""Screenshots of the MLflow UI over a throwaway store filled by sae-mlops (a browser check; not in CI).

Starts ``mlflow server`` on 127.0.0.1 (sqlite store and artifacts in a temporary directory), fills it
through that server with the sae-mlops CLI (``demo``, ``import --register --alias``, ``quick --sae
models:/...@alias``, ``full``, optionally ``train --register``, ``compare``; small token budgets), then
drives headless Chromium with Playwright and saves PNGs of: the runs list, a run's overview, the
artifacts view on the full analysis's report, the comparison of three runs, the chart view with an
L0 / loss-recovered scatter, the model version page and the logged model page.

Playwright is not a dependency of sae-mlops: run this with a Python that has it, and point
``--sae-python`` at the Python that has sae-mlops and mlflow::

    python3 -m venv /work/pwvenv && /work/pwvenv/bin/pip install playwright
    apt-get install -y chromium
    /work/pwvenv/bin/python scripts/ui_snapshots.py --sae-python .venv/bin/python --out shots/

Everything it starts is stopped at the end; the store is deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "sae-mlops-demo"
MODEL = "demo-sae"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the MLflow server did not answer at {url} within {seconds:.0f} s")


def sae_mlops(python: str, env: dict[str, str], *args: str) -> str:
    """Run `sae-mlops ARGS` with `python`; return its stdout (stop on failure)."""
    cmd = [str(Path(python).parent / "sae-mlops"), *args]  # the console script beside that Python
    print("$ sae-mlops", " ".join(args), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=env["WORKDIR"], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"sae-mlops {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def api(base: str, path: str, payload: dict | None = None) -> dict:
    """MLflow REST call (GET with query for payload=None is not needed here; POST JSON)."""
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(payload or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def get(base: str, path: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def fill(python: str, env: dict[str, str], tokens: int, train: bool) -> None:
    sae_mlops(python, env, "demo", "--max-tokens", str(tokens), "--experiment", EXPERIMENT, "-q")
    demo = subprocess.run([python, "-c", "from sae_mlops.demo import demo_sae_path as p; print(p('batchtopk')); print(p('saelens'))"],
                          env=env, capture_output=True, text=True, check=True).stdout.split()
    sae_mlops(python, env, "import", demo[0], "--register", MODEL, "--alias", "champion", "--experiment", EXPERIMENT, "-q")
    sae_mlops(python, env, "quick", "--sae", f"models:/{MODEL}@champion", "--max-tokens", str(tokens), "--experiment", EXPERIMENT, "-q")
    sae_mlops(python, env, "full", "--sae", demo[1], "--model", "demo", "--max-tokens", str(tokens), "--heatmap-features", "64",
              "--experiment", EXPERIMENT, "-q")
    if train:
        sae_mlops(python, env, "train", "--d-sae", "256", "--k", "8", "--training-tokens", "20000", "--register", "demo-sae-trained",
                  "--experiment", EXPERIMENT, "-q")
    out = sae_mlops(python, env, "compare", "-e", EXPERIMENT, "--format", "md", "-q")
    print(out, flush=True)


def runs_of(base: str) -> tuple[str, list[dict]]:
    exp = get(base, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
    runs = api(base, "runs/search", {"experiment_ids": [exp], "max_results": 100})["runs"]
    return exp, runs


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)


def shoot(page, url: str, path: Path, wait_text: str | None = None, settle: float = 2.5) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    if wait_text:
        try:
            page.get_by_text(wait_text, exact=False).first.wait_for(timeout=20000)
        except Exception as exc:  # noqa: BLE001 - a missing text is reported, the shot still taken
            print(f"  (did not see {wait_text!r}: {exc.__class__.__name__})")
    time.sleep(settle)
    page.screenshot(path=str(path), full_page=False)
    print(f"saved {path}  <- {url}", flush=True)


def add_scatter(page) -> None:
    """In the chart view: Add chart -> Scatter chart, X = sparsity/l0_mean, Y = downstream/loss_recovered."""
    page.get_by_role("button", name=re.compile("Add chart", re.I)).first.click()
    page.get_by_text(re.compile("^Scatter chart$", re.I)).first.click()
    time.sleep(1.0)
    for axis, metric in (("X axis", "sparsity/l0_mean"), ("Y axis", "downstream/loss_recovered")):
        box = page.get_by_text(axis, exact=True).first.locator("xpath=following::*[@role='combobox' or self::input][1]")
        box.click()
        page.keyboard.type(metric)
        time.sleep(0.5)
        page.get_by_role("option", name=re.compile(re.escape(metric))).first.click()
        time.sleep(0.5)
    page.get_by_role("button", name=re.compile("^(Add chart|Save changes)$", re.I)).last.click()
    time.sleep(1.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae-python", default=str(ROOT / ".venv" / "bin" / "python"), help="Python with sae-mlops and mlflow")
    ap.add_argument("--out", type=Path, default=Path("shots"), help="where the PNGs go")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    ap.add_argument("--tokens", type=int, default=3000, help="token budget per analysis")
    ap.add_argument("--no-train", action="store_true", help="skip `sae-mlops train` (the slowest step)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store and print where it is")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ui_snapshots_"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": base, "WORKDIR": str(work), "PYTHONPATH": str(ROOT)}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(var, None)
    server = subprocess.Popen(
        [args.sae_python, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "artifacts"),
         "--workers", "1"],
        cwd=work, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(f"{base}/health")
        fill(args.sae_python, env, args.tokens, not args.no_train)
        exp, runs = runs_of(base)
        by_kind: dict[str, list[dict]] = {}
        for r in runs:
            by_kind.setdefault(tag(r, "sae_mlops.kind") or "?", []).append(r)
        quick_alias = next(r for r in by_kind["quick"] if "@champion" in r["info"]["run_name"])
        full = by_kind["full"][0]
        three = [r["info"]["run_id"] for r in (by_kind["quick"] + by_kind["full"])[:3]]
        model_id = tag(quick_alias, "sae_mlops.source_logged_model_id")
        ml = "workflowType=machine_learning"
        pages = [
            ("1_runs_list.png", f"{base}/#/experiments/{exp}/runs?{ml}", "quick ·"),
            ("2_run_overview.png", f"{base}/#/experiments/{exp}/runs/{quick_alias['info']['run_id']}?{ml}", "loss recovered"),
            ("3_artifacts_report.png", f"{base}/#/experiments/{exp}/runs/{full['info']['run_id']}/artifacts/README.html", "README.html"),
            ("3b_artifacts_readme_md.png", f"{base}/#/experiments/{exp}/runs/{full['info']['run_id']}/artifacts/README.md", "README.md"),
            ("4_compare_three_runs.png",
             f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(three))}&experiments={urllib.parse.quote(json.dumps([exp]))}",
             "sparsity/l0_mean"),
            ("6_model_version.png", f"{base}/#/models/{MODEL}/versions/1", "Latest analysis"),
            ("7_logged_model.png", f"{base}/#/experiments/{exp}/models/{model_id}", MODEL),
        ]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            for name, url, text in pages:
                shoot(page, url, args.out / name, text)
            # the chart view, with the scatter the experiment description asks for
            shoot(page, f"{base}/#/experiments/{exp}/runs?{ml}&compareRunsMode=CHART", args.out / "5a_chart_view.png", "Add chart")
            try:
                add_scatter(page)
            except Exception as exc:  # noqa: BLE001 - the UI changed: keep the plain chart view shot
                print(f"  could not add the scatter ({exc.__class__.__name__}: {str(exc)[:200]})")
            time.sleep(2)
            page.screenshot(path=str(args.out / "5b_chart_view_scatter.png"))
            print(f"saved {args.out / '5b_chart_view_scatter.png'}")
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        if args.keep:
            print(f"store kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
