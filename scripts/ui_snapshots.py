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
    page.goto(url, wait_until="load")
    if wait_text:
        try:
            page.get_by_text(wait_text, exact=False).first.wait_for(timeout=20000)
        except Exception as exc:  # noqa: BLE001 - a missing text is reported, the shot still taken
            print(f"  (did not see {wait_text!r}: {exc.__class__.__name__})")
    time.sleep(settle)
    close_assistant(page)
    page.screenshot(path=str(path), full_page=False)
    print(f"saved {path}  <- {url}", flush=True)


def close_assistant(page) -> None:
    """Close MLflow 3.17's "MLflow Assistant" side panel (it hides a third of the page), if open."""
    close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count() and close.first.is_visible():
        close.first.click()
        time.sleep(0.5)


def add_chart(page, kind: str, axes: dict[str, str] | None = None) -> None:
    """In the chart view: Add chart -> `kind` ("Scatter chart", "Image grid"), axes set by typing the
    metric into each axis's search box."""
    search = page.get_by_placeholder(re.compile("Search metric charts", re.I))
    if search.count():
        search.first.fill("")  # with a search, the chart view hides "Add chart"
        time.sleep(1.0)
    page.get_by_role("button", name=re.compile("Add chart", re.I)).first.click()
    page.get_by_role("menuitem", name=kind).click()
    time.sleep(1.5)
    for axis, metric in (axes or {}).items():
        field = page.locator("[data-testid=experiment-view-compare-runs-config-field]").filter(has_text=axis)
        field.locator(".du-bois-light-select-selector").first.click()
        page.keyboard.type(metric)
        time.sleep(0.8)
        page.locator(f".du-bois-light-select-item-option[title='{metric}']").first.click()
        time.sleep(0.8)
    page.get_by_role("button", name=re.compile("^Add chart$", re.I)).last.click()
    time.sleep(2.0)
    # only the charts of the X metric (the new scatter among them), or the image charts
    if search.count():
        search.first.fill(axes["X axis"] if axes else "l0_histogram")
        time.sleep(2.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with paths made absolute: the servers and commands run in the store's folder, so a
    relative ``--sae-python .venv/bin/python`` (as documented) must not be read from there."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae-python", default=str(ROOT / ".venv" / "bin" / "python"), help="Python with sae-mlops and mlflow")
    ap.add_argument("--out", type=Path, default=Path("shots"), help="where the PNGs go")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    ap.add_argument("--tokens", type=int, default=3000, help="token budget per analysis")
    ap.add_argument("--no-train", action="store_true", help="skip `sae-mlops train` (the slowest step)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store and print where it is")
    ap.add_argument("--store", type=Path, default=None, help="reuse a store this script kept (--keep): no filling")
    args = ap.parse_args(argv)
    if os.sep in args.sae_python:  # a path, not a command found on PATH; abspath keeps the venv's symlink
        args.sae_python = os.path.abspath(args.sae_python)
    args.out = args.out.absolute()
    args.store = args.store.absolute() if args.store else None
    return args


def main() -> None:
    args = parse_args()

    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.store or Path(tempfile.mkdtemp(prefix="ui_snapshots_"))
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
        if args.store is None:
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
        run_page = f"{base}/#/experiments/{exp}/runs"
        pages = [
            ("1_runs_list.png", f"{run_page}?{ml}", "quick ·"),
            ("2_run_overview.png", f"{run_page}/{quick_alias['info']['run_id']}?{ml}", "loss recovered"),
            ("3_artifacts_report.png", f"{run_page}/{full['info']['run_id']}/artifacts/README.html?{ml}", "README.html"),
            ("4_compare_three_runs.png",
             f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(three))}&experiments={urllib.parse.quote(json.dumps([exp]))}&{ml}",
             "sparsity/l0_mean"),
            ("6_model_version.png", f"{base}/#/models/{MODEL}/versions/1?{ml}", "Latest analysis"),
            ("7_logged_model.png", f"{base}/#/experiments/{exp}/models/{model_id}?{ml}", MODEL),
        ]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            for name, url, text in pages:
                shoot(page, url, args.out / name, text, settle=6.0 if name.startswith("4_") else 2.5)
                if name.startswith("2_"):  # the whole description
                    more = page.get_by_text("Show more", exact=True)
                    if more.count():
                        more.first.click()
                        time.sleep(1.0)
                    page.screenshot(path=str(args.out / "2b_run_overview_full.png"), full_page=True)
                if name.startswith("3_"):  # the report's plots (inside the viewer's iframe), then README.md
                    try:
                        page.frame_locator("iframe").first.locator("img").first.scroll_into_view_if_needed(timeout=10000)
                        time.sleep(1)
                        page.screenshot(path=str(args.out / "3b_artifacts_report_plots.png"))
                        page.get_by_text("README.md", exact=True).first.click()
                        time.sleep(2.5)
                        page.screenshot(path=str(args.out / "3c_artifacts_readme_md.png"))
                    except Exception as exc:  # noqa: BLE001 - report and keep going
                        print(f"  report plots/README.md: {exc.__class__.__name__}: {str(exc)[:200]}")
            # the chart view, with the scatter the experiment description asks for, and the image grid
            shoot(page, f"{run_page}?{ml}&compareRunsMode=CHART", args.out / "5a_chart_view.png", "Add chart")
            for shot, kind, axes in (
                ("5b_chart_view_scatter.png", "Scatter chart", {"X axis": "sparsity/l0_mean", "Y axis": "downstream/loss_recovered"}),
                ("5c_chart_view_images.png", None, None),
            ):
                try:
                    if kind:
                        add_chart(page, kind, axes)
                    else:  # the plots logged as images get one chart per key: show those of the heatmaps
                        page.get_by_placeholder(re.compile("Search metric charts", re.I)).first.fill("heatmap")
                        time.sleep(3.0)
                        page.screenshot(path=str(args.out / "5c_chart_view_image_cards.png"))
                        # a card lists every param of the run above its image: open one full screen
                        card = page.locator("[data-testid=experiment-view-compare-runs-card]").filter(has_text="similarity_heatmap")
                        card.locator("button[data-component-id=fullscreen_button_chartcard]").first.click()
                        time.sleep(3.0)
                except Exception as exc:  # noqa: BLE001 - the UI changed: keep the plain chart view shot
                    print(f"  could not add the {kind} ({exc.__class__.__name__}: {str(exc)[:200]})")
                    page.keyboard.press("Escape")
                page.screenshot(path=str(args.out / shot))
                print(f"saved {args.out / shot}")
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        if args.keep or args.store:
            print(f"store kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
