"""LLM labels over real HTTP against a small OpenAI-compatible server on 127.0.0.1
(tests/openai_stub.py): validated answers with retries on malformed JSON, a 429 and a timeout
retried with backoff, a feature given up and retried by the next run, resume after an
interruption (SIGINT to a running `sae-mlops label`), detection scores, the key never written,
and logging to the analysis run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feature_fixtures import shared_demo_full
from openai_stub import Script, StubServer
from pydantic import ValidationError
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.features import label as L

SECRET = "sk-test-not-a-real-key-12345"


@pytest.fixture(scope="module")
def analysis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_demo_full(tmp_path_factory)


@pytest.fixture
def root(analysis: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "A"
    shutil.copytree(analysis, dst)
    return dst


def top_features(root: Path, n: int) -> list[int]:
    stats = pd.read_parquet(next((root / "results").glob("feature_stats*.parquet")))
    fired = stats[stats.firing_count > 0].sort_values(["firing_count", "feature"], ascending=[False, True])
    return sorted(fired.feature.head(n).astype(int).tolist())


def test_parsing_validation_scores_and_rate_limit() -> None:
    assert L.parse_json_object('Here:\n```json\n{"a": 1}\n```') == {"a": 1}
    assert L.parse_json_object('text {"a": {"b": 2}} more') == {"a": {"b": 2}}
    with pytest.raises(ValueError):
        L.parse_json_object("{label: x")
    good = {"label": "x", "description": "y", "category": "c", "monosemantic": True, "interpretability": 3, "knowledge_domain": "d", "abstraction_level": "Semantic"}
    assert L.FeatureLabel.model_validate(good).abstraction_level == "semantic"
    for bad in ({**good, "interpretability": 6}, {**good, "abstraction_level": "deep"}, {k: v for k, v in good.items() if k != "label"}):
        with pytest.raises(ValidationError):
            L.FeatureLabel.model_validate(bad)
    truth, answer = [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]
    acc, bal = L.detection_scores(truth, answer)
    assert acc == pytest.approx(3 / 5) and bal == pytest.approx((2 / 3 + 1 / 2) / 2)
    limiter, t0 = L.RateLimiter(rpm=600), time.monotonic()
    for _ in range(4):
        limiter.wait()
    assert time.monotonic() - t0 >= 0.29  # 4 starts at least 0.1 s apart


def test_label_faults_detection_and_resume(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    feats = top_features(root, 6)
    f_bad_once, f_429, f_slow, f_never = feats[:4]
    script = Script(malformed_once={f_bad_once}, rate_limited_once={f_429}, slow_once={f_slow}, always_malformed={f_never}, slow_seconds=3.0)
    opts = L.LabelOptions(model="stub", concurrency=3, rpm=0, max_tries=2, http_retries=3, timeout=1.0)
    with StubServer(script) as server:
        opts.base_url = server.url
        out = L.label_features(root, opts, top=6)
    done = L.read_done(out.labels_file)
    assert out.failed == [f_never] and sorted(done) == sorted(set(feats) - {f_never})
    assert all(e["auth"] == f"Bearer {SECRET}" for e in server.log)
    for f in done:
        rec = done[f]
        assert rec["label"] == f"feature {f}" and rec["interpretability"] == 1 + f % 5 and rec["abstraction_level"] == "token"
        truth = np.asarray(rec["detection_truth"])
        assert rec["detection_answer"] == [1] * len(truth)  # the stub says every snippet is active
        assert rec["detection_accuracy"] == pytest.approx(truth.mean()) and rec["detection_balanced_accuracy"] == pytest.approx(0.5)
        assert truth.sum() == 5 and len(truth) == 10
    assert done[f_bad_once]["tries"] == 2
    retry = [e for e in server.log if e["feature"] == f_bad_once and e["kind"] == "label"]
    assert [e["turns"] for e in retry] == [2, 4]  # the malformed answer and the error went back to the model
    assert [e["status"] for e in server.log if e["feature"] == f_429 and e["kind"] == "label"] == [429, 200]
    assert [e["status"] for e in server.log if e["feature"] == f_slow and e["kind"] == "label"][:1] == ["slow"]
    failures = [json.loads(x) for x in (out.out_dir / "failures.jsonl").read_text().splitlines()]
    assert [x["feature"] for x in failures] == [f_never] and "2 tries" in failures[0]["error"]
    m = out.metrics
    assert m["label/features_labelled"] == 5 and m["label/failed"] == 1
    assert m["label/requests"] == 5 * 2 + 1 + 2  # label + detection each, one retry, two malformed answers
    assert m["label/tokens_total"] == 120 * m["label/requests"]
    assert m["label/mean_interpretability"] == pytest.approx(np.mean([1 + f % 5 for f in done]))
    assert m["label/share_monosemantic"] == pytest.approx(np.mean([f % 2 == 0 for f in done]))
    table = pd.read_parquet(out.out_dir / "labels.parquet")
    assert sorted(table.feature) == sorted(done)
    for p in out.out_dir.iterdir():
        assert SECRET not in p.read_text(errors="ignore")
    # resume: only the feature that failed is asked again, and now it succeeds
    with StubServer() as server:
        opts.base_url = server.url
        again = L.label_features(root, opts, top=6)
    assert {e["feature"] for e in server.log} == {f_never} and again.skipped == 5 and again.failed == []
    assert sorted(L.read_done(again.labels_file)) == feats


def test_interrupted_run_resumes(root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]), "OPENAI_API_KEY": SECRET}
    labels = root / "labels" / "labels.jsonl"
    # Two features are answered, the third request is held until the SIGINT has been sent: the
    # interrupt lands mid-run however loaded the machine is.
    script = Script(hold_after=2, delay=0.2)
    with StubServer(script) as server:
        cmd = [sys.executable, "-c", "from sae_mlops.cli import app; app()", "label", str(root), "--base-url", server.url, "--model", "stub",
               "--top", "8", "--concurrency", "1", "--rpm", "0", "--no-detection", "--no-log", "-q"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300  # the child imports torch first
            while not script.held.wait(0.5) and proc.poll() is None and time.monotonic() < deadline:
                pass
            assert script.held.is_set() and proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert len(labels.read_text().splitlines()) == 2  # concurrency 1: both answers were written before the third request
            proc.send_signal(signal.SIGINT)
            script.release.set()  # the held answer comes 0.2 s later; the remaining features are never asked
            proc.wait(timeout=60)
        finally:
            script.release.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, proc.stdout.read().decode() if proc.stdout else ""
    first = L.read_done(labels)
    assert 2 <= len(first) < 8 and all(json.loads(x) for x in labels.read_text().splitlines())
    with StubServer() as server:
        out = L.label_features(root, L.LabelOptions(model="stub", base_url=server.url, rpm=0, detection=False), top=8)
    asked = {e["feature"] for e in server.log}
    assert not asked & set(first) and out.skipped == len(first) and out.labelled_now == 8 - len(first)
    assert sorted(L.read_done(labels)) == top_features(root, 8)


def test_label_cli_logs_to_run_and_dashboard_shows_labels(root: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("x"))
    with StubServer() as server:
        r = CliRunner().invoke(app, ["label", str(root), "--base-url", server.url, "--model", "stub", "--top", "3", "--rpm", "0", "--run-id", run.info.run_id])
    assert r.exit_code == 0, r.output
    got = client.get_run(run.info.run_id).data
    assert got.metrics["label/features_labelled"] == 3 and got.metrics["label/tokens_total"] == 120 * 6
    assert got.tags["sae_mlops.label_model"] == "stub" and got.tags["sae_mlops.label_endpoint"] == server.url
    names = {f.path for f in client.list_artifacts(run.info.run_id, "labels")}
    assert {"labels/labels.jsonl", "labels/labels.parquet", "labels/labels.md", "labels/label_summary.json", "labels/labels_table.json"} <= names
    everything = json.dumps({"params": got.params, "tags": got.tags})
    assert SECRET not in everything
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="labels", dst_path=str(root / "dl")))
    assert all(SECRET not in p.read_text(errors="ignore") for p in local.iterdir())
    f = top_features(root, 1)[0]
    d = CliRunner().invoke(app, ["dashboard", str(root), "--top", "3", "--no-log", "-q"])
    assert d.exit_code == 0, d.output
    assert f"feature {f}" in (root / "dashboard" / f"feature_{f}.html").read_text()
    # by run id: the analysis and the earlier labels come from the run; only the new feature is asked
    client.log_artifacts(run.info.run_id, str(root / "results"), "results")
    client.log_artifacts(run.info.run_id, str(root / "matrices"), "matrices")
    client.log_artifacts(run.info.run_id, str(root / "activation_database"), "activation_database")
    rid = run.info.run_id
    with StubServer() as server:
        r = CliRunner().invoke(app, ["label", f"runs:/{rid}", "--base-url", server.url, "--model", "stub", "--top", "4", "--rpm", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert {e["feature"] for e in server.log} == set(top_features(root, 4)) - set(top_features(root, 3))
    assert client.get_run(rid).data.metrics["label/features_labelled"] == 4
    d = CliRunner().invoke(app, ["dashboard", rid, "--top", "4", "-q"])
    assert d.exit_code == 0, d.output
    page = Path("analysis", "runs", rid, "dashboard", f"feature_{top_features(root, 4)[-1]}.html").read_text()
    assert f"feature {top_features(root, 4)[-1]}" in page
    assert "dashboard/index.html" in {x.path for x in client.list_artifacts(rid, "dashboard")}
    no_key = CliRunner().invoke(app, ["label", str(root), "--top", "5"], env={"OPENAI_API_KEY": ""})
    assert no_key.exit_code == 2 and "OPENAI_API_KEY" in no_key.output


def test_prior_fields_failed_detection_and_nothing_labelled(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers in the prior labeler's shape (interpretability_score, extra fields, 'lexical') are
    accepted; a failed detection request keeps the label (without a score); a run that labels nothing
    returns only files that exist (the CLI logs them)."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    feats = top_features(root, 4)
    prior, no_detection = feats[0], feats[1]
    with StubServer(Script(prior_fields={prior}, detection_fails={no_detection})) as server:
        opts = L.LabelOptions(model="stub", base_url=server.url, rpm=0, max_tries=2, http_retries=0, timeout=5.0)
        out = L.label_features(root, opts, feats, top=0)
    assert out.failed == []
    done = L.read_done(out.labels_file)
    assert set(done) == set(feats)
    assert done[prior]["interpretability"] == 4 and done[prior]["abstraction_level"] == "token"
    assert done[no_detection]["label"] == f"feature {no_detection}" and "detection_error" in done[no_detection]
    assert done[no_detection].get("detection_balanced_accuracy") is None
    assert done[feats[2]]["detection_balanced_accuracy"] is not None

    empty = root.parent / "B"
    shutil.copytree(root, empty)
    shutil.rmtree(empty / "labels")
    nothing = L.label_features(empty, L.LabelOptions(model="stub", base_url="http://127.0.0.1:9/v1", rpm=0), None, top=0)
    assert nothing.labelled_now == 0
    assert all(Path(f).is_file() for f in nothing.files), nothing.files


def test_resume_by_run_id_keeps_local_progress(tmp_path: Path, mlflow_store: str) -> None:
    """Labels downloaded from the run are merged into the local file: a feature labelled locally keeps
    its local label, features only in the run are added."""
    import mlflow

    from sae_mlops.tracking.features import download_labels

    logged = tmp_path / "logged" / "labels"
    logged.mkdir(parents=True)
    (logged / "labels.jsonl").write_text("".join(json.dumps({"feature": f, "label": f"run {f}"}) + "\n" for f in (1, 2)))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(logged), "labels")
    local = tmp_path / "A" / "labels"
    local.mkdir(parents=True)
    (local / "labels.jsonl").write_text("".join(json.dumps({"feature": f, "label": f"local {f}"}) + "\n" for f in (2, 3)))
    assert download_labels(run.info.run_id, tmp_path / "A")
    got = L.read_done(local / "labels.jsonl")
    assert {f: r["label"] for f, r in got.items()} == {1: "run 1", 2: "local 2", 3: "local 3"}
