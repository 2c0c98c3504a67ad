"""Tracking that fails after the analysis (and `sae-mlops log` afterwards), Ctrl-C, and the tracking
preflight against real servers on 127.0.0.1 (started and stopped by fixtures)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.errors import TrackingError
from sae_mlops.tracking.preflight import check_tracking_store

runner = CliRunner()
TOKENS = "600"


@contextmanager
def http_server(health: int, api: int = 403):
    """A real HTTP server on 127.0.0.1: `health` on GET /health, `api` (with an MLflow-style JSON
    error body) on every other request."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            code = health if self.path.rstrip("/").endswith("/health") else api
            body = b"OK" if code == 200 else json.dumps({"error_code": "PERMISSION_DENIED", "message": "not allowed"}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def silent_server():
    """A TCP server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _error_line(r) -> str:
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


# --- the tracking preflight ------------------------------------------------------------------


def test_preflight_accepts_any_answering_server():
    for code in (200, 401, 404):
        with http_server(health=code) as uri:
            assert check_tracking_store(uri) == uri


def test_preflight_refuses_5xx_timeouts_and_closed_ports():
    with http_server(health=503) as uri, pytest.raises(TrackingError, match="answers HTTP 503"):
        check_tracking_store(uri)
    with silent_server() as uri:
        start = time.monotonic()
        with pytest.raises(TrackingError, match="did not answer within 0.5 s"):
            check_tracking_store(uri, timeout_s=0.5)
        assert time.monotonic() - start < 5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TrackingError, match="connection refused"):
        check_tracking_store(closed)


# --- tracking that fails after the analysis, then `sae-mlops log` -----------------------------


def test_tracking_failure_after_the_analysis_names_the_files_then_log_logs_them(tmp_path, mlflow_store, demo_assets, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from sae_mlops.demo import demo_sae_path

    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # the environment decides

    out = tmp_path / "out"
    with http_server(health=200, api=403) as uri:  # answers the preflight, refuses the logging
        r = runner.invoke(
            app,
            ["quick", "--sae", str(demo_sae_path("standard")), "--model", "demo", "--max-tokens", TOKENS, "--out", str(out), "-q"],
            env={"MLFLOW_TRACKING_URI": uri},
            terminal_width=400,
        )
    assert r.exit_code == 2, r.output
    line = _error_line(r)
    assert f"the analysis finished and its files are in {out}" in line and f"sae-mlops log {out}" in line
    assert "403" in line or "PERMISSION_DENIED" in line or "not allowed" in line
    (results,) = (out / "results").glob("analysis_results*.json")
    assert list(out.glob("SUMMARY*.md"))

    r = runner.invoke(app, ["log", str(out), "--experiment", "later", "--run-name", "logged-later", "-q"], terminal_width=400)
    assert r.exit_code == 0, r.output
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "logged-later"
    assert run.info.run_id in r.stdout
    saved = json.loads(results.read_text())
    from sae_mlops.tracking.runs import split_timings

    finite = {k: v for k, v in split_timings(saved["metrics"])[0].items() if v is not None}
    assert run.data.metrics == pytest.approx(finite)
    assert run.data.params["tokens_analysed"] == TOKENS
    assert run.data.tags["sae_mlops.kind"] == "quick"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "results")
    }
    expected = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert expected <= logged


# --- Ctrl-C -------------------------------------------------------------------------------------


def test_interrupt_while_logging_marks_the_run_killed(tmp_path, mlflow_store, demo_assets, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sae_mlops.demo import demo_sae_path

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C would, while the artifacts upload

    monkeypatch.setattr(MlflowClient, "log_artifact", interrupted)
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["quick", "--sae", str(demo_sae_path("standard")), "--model", "demo", "--max-tokens", TOKENS, "--out", str(out),
         "--experiment", "ctrl-c", "-q"],
        terminal_width=400,
    )
    assert r.exit_code == 130, r.output
    line = _error_line(r)
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    assert run.info.status == "KILLED"
    assert f"MLflow run {run.info.run_id} was marked KILLED" in line
    assert f"the files in {out} are complete" in line and f"sae-mlops log {out}" in line


def test_interrupt_during_the_full_pass_leaves_nothing_and_kills_its_run(tmp_path, mlflow_store, demo_assets, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sae_mlops.demo import demo_sae_path
    from sae_mlops.core.engine import Engine

    real_step, calls = Engine.step, {"n": 0}

    def step(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Engine, "step", step)
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["full", "--sae", str(demo_sae_path("batchtopk")), "--model", "demo", "--max-tokens", "3000", "--batch-size", "2",
         "--out", str(out), "-q"],
        terminal_width=400,
    )
    assert r.exit_code == 130, r.output
    line = _error_line(r)
    # the run was created when the pass started, and is KILLED now
    assert f"nothing was written to {out}" in line and "was marked KILLED" in line
    assert not any(p.is_file() for p in out.rglob("*"))
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]  # created when the pass started
    assert runs[0].info.run_id in line


def test_a_cli_subprocess_of_a_test_can_be_interrupted():
    """The SIGINT tests below need their child to turn SIGINT into KeyboardInterrupt, also when the
    suite itself was started with SIGINT ignored (in the background by a shell without job control:
    tests/conftest.py restores a handler)."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_sigint_during_a_quick_analysis_under_mlflow_run(tmp_path, mlflow_store, demo_assets):
    """A real SIGINT to a real process whose run exists beforehand (MLFLOW_RUN_ID, as `mlflow run` sets)."""
    from mlflow.tracking import MlflowClient

    from sae_mlops.demo import demo_sae_path

    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("sigint")).info.run_id
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "MLFLOW_RUN_ID": run_id, "COLUMNS": "400"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", "from sae_mlops.cli import app; app()", "quick", "--sae", str(demo_sae_path("standard")),
           "--model", "demo", "--max-tokens", "1000000", "--batch-size", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    corpus_loaded = threading.Event()

    def read() -> None:
        for ln in iter(proc.stderr.readline, ""):
            lines.append(ln)
            if "corpus" in ln:
                corpus_loaded.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # The corpus is logged once the command runs inside the pipeline, with the model loading: a
    # Ctrl-C there must still mark the run KILLED at once (the store was opened in the preflight).
    deadline = time.monotonic() + 300  # imports on a loaded machine
    while not corpus_loaded.wait(0.5) and proc.poll() is None and time.monotonic() < deadline:
        pass
    assert corpus_loaded.is_set() and proc.poll() is None, "".join(lines)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)  # not communicate(): the reader thread owns stderr; measured 3 s at a load of 20
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stdout = proc.stdout.read()
    stderr = "".join(lines)
    assert proc.returncode == 130, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in stderr + stdout, stderr
    assert f"nothing was written to {out}" in errors[0]
    assert f"MLflow run {run_id} was marked KILLED" in errors[0]
    assert not out.exists()
    assert client.get_run(run_id).info.status == "KILLED"


def test_preflight_failures_keep_their_cause_for_the_service():
    """The service sorts failures by the exception chain: an unreachable store must read as one."""
    import requests

    from sae_mlops.service.mlflow_io import UNAVAILABLE, classify

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TrackingError) as refused:
        check_tracking_store(closed)
    assert isinstance(refused.value.__cause__, requests.ConnectionError)
    with http_server(health=502) as uri, pytest.raises(TrackingError) as bad_gateway:
        check_tracking_store(uri)
    assert classify(refused.value) == classify(bad_gateway.value) == UNAVAILABLE


def test_interrupt_while_writing_says_which_files_are_partial(tmp_path, demo_assets, monkeypatch):
    import sae_mlops.outputs.full_reports as writers
    from sae_mlops.demo import demo_sae_path

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C would, between the database and the summary

    monkeypatch.setattr(writers, "summary_dict", interrupted)
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["full", "--sae", str(demo_sae_path("standard")), "--model", "demo", "--max-tokens", "1500", "--out", str(out),
         "--no-track", "-q"],
        terminal_width=400,
    )
    assert r.exit_code == 130, r.output
    line = _error_line(r)
    n = sum(1 for p in out.rglob("*") if p.is_file())
    assert n > 0 and not list(out.glob("SUMMARY*"))
    assert f"{out} holds {n} partial file(s) of an unfinished analysis: delete it" in line
    assert "nothing was tracked (--no-track)" in line
