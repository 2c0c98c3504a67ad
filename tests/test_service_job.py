"""The job process entry (`python -m sae_mlops.service.job`): the analysis calls are replaced by
stand-ins, the MLflow store is real (a sqlite tracking store in a temporary directory).

Exactly once: the job's run is created before the analysis with the job key; an earlier attempt's
FINISHED run is reused without analysing, its RUNNING runs are ended FAILED; an exception ends the
attempt's run FAILED. Exit codes: 2 input error, 75 tracking server unavailable, 1 a bug.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlflow_servers import free_port
from sae_mlops import workflows as pipeline
from sae_mlops.errors import InputError
from sae_mlops.service import job as job_module
from sae_mlops.service.mlflow_io import RegistryIO

EXP = "exp"


@dataclass
class _Result:
    metrics: dict = field(default_factory=dict)


@dataclass
class _Outcome:
    run_id: str
    result: _Result
    warnings: list = field(default_factory=list)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('job_store') / 'mlflow.db'}"


@pytest.fixture
def calls(monkeypatch):
    seen: list = []

    def quick(cfg, out_dir, *, track, experiment, run_name, take_over_out=False):
        seen.append(("quick", cfg, out_dir, track, experiment, run_name, os.environ.get("MLFLOW_RUN_ID")))
        return _Outcome(os.environ["MLFLOW_RUN_ID"], _Result({"sparsity/l0_mean": 5.0, "downstream/loss_recovered": float("nan")}),
                        ["few tokens"])

    def full(cfg, out_dir, *, opts, track, experiment, run_name, take_over_out=False):
        seen.append(("full", cfg, out_dir, opts, experiment, run_name))
        return _Outcome(os.environ["MLFLOW_RUN_ID"], _Result({"features/dead_fraction": 0.1}))

    monkeypatch.setattr(pipeline, "run_quick_and_log", quick)
    monkeypatch.setattr(pipeline, "run_full_and_log", full)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return seen


def _spec(tmp_path: Path, store: str, **kw) -> dict:
    spec = {
        "job_id": 7, "job_key": f"k{time.monotonic_ns()}:7", "attempt": 1, "model_name": "sae-a", "version": "3",
        "kind": "quick", "options": {"max_tokens": 100, "batch_size": 4},
        "trigger": "model_version.created", "device": "cpu", "experiment": EXP, "tracking_uri": store,
        "out_dir": str(tmp_path / "out"), "result_path": str(tmp_path / "result.json"), "log_format": "json", "log_level": "INFO",
    }
    spec.update(kw)
    return spec


def test_quick_job_analyses_the_version_into_a_tagged_run(calls, tmp_path, store):
    spec = _spec(tmp_path, store)
    result = job_module.run_job(spec)
    kind, cfg, out_dir, track, experiment, run_name, env_run = calls[0]
    assert kind == "quick" and track and experiment == EXP and run_name == "quick sae-a v3"
    assert cfg.sae == "models:/sae-a/3" and cfg.device == "cpu" and cfg.progress is False
    assert cfg.max_tokens == 100 and cfg.batch_size == 4 and out_dir == tmp_path / "out"
    assert env_run == result["run_id"] and "MLFLOW_RUN_ID" not in os.environ  # set for the analysis only
    assert result == {"job_id": 7, "kind": "quick", "run_id": env_run, "metrics": {"sparsity/l0_mean": 5.0}, "warnings": ["few tokens"]}
    (run,) = RegistryIO(store).job_runs(EXP, spec["job_key"])
    assert run.info.run_id == env_run and run.info.status == "FINISHED"
    assert run.data.tags["sae_mlops.service.job_id"] == "7" and run.data.tags["sae_mlops.service.trigger"] == "model_version.created"
    assert run.data.tags["sae_mlops.service.attempt"] == "1"


def test_a_retry_closes_the_running_run_of_the_killed_attempt(calls, tmp_path, store):
    spec = _spec(tmp_path, store)
    reg = RegistryIO(store)
    stale = reg.create_job_run(EXP, "quick sae-a v3", {"sae_mlops.service.job_key": spec["job_key"]})  # attempt 1, killed
    result = job_module.run_job({**spec, "attempt": 2})
    runs = {r.info.run_id: r.info.status for r in reg.job_runs(EXP, spec["job_key"])}
    assert runs == {stale: "FAILED", result["run_id"]: "FINISHED"}


def test_a_retry_reuses_a_finished_run_without_analysing(calls, tmp_path, store):
    spec = _spec(tmp_path, store)
    reg = RegistryIO(store)
    done = reg.create_job_run(EXP, "quick sae-a v3", {"sae_mlops.service.job_key": spec["job_key"]})
    reg.client.log_metric(done, "sparsity/l0_mean", 9.0)
    reg.end_run(done, "FINISHED")  # attempt 1 finished, then died before writing result.json
    result = job_module.run_job({**spec, "attempt": 2})
    assert calls == [] and result["run_id"] == done and result["metrics"] == {"sparsity/l0_mean": 9.0}
    assert [r.info.status for r in reg.job_runs(EXP, spec["job_key"])] == ["FINISHED"]


def test_an_exception_ends_the_run_failed(calls, tmp_path, store, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(pipeline, "run_quick_and_log", boom)
    spec = _spec(tmp_path, store)
    with pytest.raises(RuntimeError, match="out of luck"):
        job_module.run_job(spec)
    assert [r.info.status for r in RegistryIO(store).job_runs(EXP, spec["job_key"])] == ["FAILED"]


def test_full_job_passes_full_options(calls, tmp_path, store):
    job_module.run_job(_spec(tmp_path, store, kind="full", options={"max_tokens": 50, "full_options": {"examples_per_feature": 3}}))
    kind, cfg, _, opts, _, run_name = calls[0]
    assert kind == "full" and run_name == "full sae-a v3" and cfg.max_tokens == 50
    assert opts.examples_per_feature == 3
    calls.clear()
    job_module.run_job(_spec(tmp_path, store, kind="full", options={}))
    assert calls[0][3] is None  # the library defaults


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"options": {"max_tokenz": 1}}, "AnalysisConfig does not take"),
        ({"kind": "full", "options": {"full_options": {"bogus": 1}}}, "full analysis does not take"),
        ({"kind": "medium"}, "Unknown analysis kind"),
    ],
)
def test_bad_specs_are_input_errors_before_any_run(calls, tmp_path, store, kw, words):
    spec = _spec(tmp_path, store, **kw)
    with pytest.raises(InputError, match=words):
        job_module.run_job(spec)
    assert RegistryIO(store).job_runs(EXP, spec["job_key"]) == []


def test_main_exit_codes_and_result_file(calls, tmp_path, store, monkeypatch):
    import sae_mlops.service.logs as logs

    # Not in the test process: PR_SET_PDEATHSIG and the service's root-logger setup.
    monkeypatch.setattr(job_module, "_die_with_parent", lambda: None)
    monkeypatch.setattr(logs, "setup_service_logging", lambda *a, **k: None)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec(tmp_path, store)))
    assert job_module.main([str(spec_path)]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["metrics"] == {"sparsity/l0_mean": 5.0}

    spec_path.write_text(json.dumps(_spec(tmp_path, store, kind="medium", result_path=str(tmp_path / "r2.json"))))
    assert job_module.main([str(spec_path)]) == job_module.EXIT_INPUT_ERROR
    assert not (tmp_path / "r2.json").exists()

    # The tracking server cannot be reached: exit 75 (retried without an attempt), quickly.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    spec_path.write_text(json.dumps(_spec(tmp_path, store, tracking_uri=f"http://127.0.0.1:{free_port()}",
                                          result_path=str(tmp_path / "r4.json"))))
    t0 = time.monotonic()
    assert job_module.main([str(spec_path)]) == job_module.EXIT_TRACKING_UNAVAILABLE
    assert time.monotonic() - t0 < 15 and not (tmp_path / "r4.json").exists()

    def boom(*a, **k):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(pipeline, "run_quick_and_log", boom)
    spec_path.write_text(json.dumps(_spec(tmp_path, store, result_path=str(tmp_path / "r3.json"))))
    assert job_module.main([str(spec_path)]) == job_module.EXIT_FAILED
    assert not (tmp_path / "r3.json").exists()
    assert job_module.main([]) == job_module.EXIT_INPUT_ERROR


# --- failure classes of real MLflow errors ---------------------------------------------------------


class _Canned:
    """A real HTTP server on 127.0.0.1 answering every request with one status and body."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.send_response(outer.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self.status = status
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.uri

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (503, b"<html>Service Unavailable</html>", "unavailable"),
        (500, b'{"error_code": "INTERNAL_ERROR", "message": "database is locked"}', "unavailable"),
        (403, b'{"error_code": "PERMISSION_DENIED", "message": "Permission denied"}', "denied"),
        (401, b"You are not authenticated.", "denied"),
        (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such version"}', "denied"),
        (400, b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}', "bug"),
    ],
)
def test_classify_real_mlflow_http_errors(status, body, expected, monkeypatch):
    from sae_mlops.service.mlflow_io import classify

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with _Canned(status, body, "application/json" if body.startswith(b"{") else "text/html") as uri:
        with pytest.raises(Exception) as e:
            RegistryIO(uri).mark_running("sae-a", "1", "quick", 1)
    assert classify(e.value) == expected, repr(e.value)


def test_classify_unreachable_missing_and_local_errors(store, monkeypatch):
    from mlflow.exceptions import MlflowException

    from sae_mlops.service.mlflow_io import VersionMissing, classify

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as e:
        RegistryIO(f"http://127.0.0.1:{free_port()}").get_version("sae-a", "1")
    assert classify(e.value) == "unavailable"
    with pytest.raises(VersionMissing) as e:
        RegistryIO(store).get_version("no-such-model", "1")
    assert classify(e.value) == "denied"
    assert classify(MlflowException("a local MLflow error")) == "bug" and classify(KeyError("x")) == "bug"
    try:  # the tracking layer rewrites MLflow errors into InputError; the cause still decides
        try:
            raise MlflowException("API request to http://x/api failed with exception ConnectionError")
        except MlflowException:
            raise InputError("The artifacts of models:/a/1 could not be downloaded") from None
    except InputError as err:
        assert classify(err) == "unavailable"


def test_classify_the_tracking_preflight(monkeypatch):
    from sae_mlops.errors import TrackingError
    from sae_mlops.service.mlflow_io import classify
    from sae_mlops.tracking.preflight import check_tracking_store

    with pytest.raises(TrackingError) as e:
        check_tracking_store(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert classify(e.value) == "unavailable"
    with _Canned(503, b"down", "text/plain") as uri, pytest.raises(TrackingError) as e:
        check_tracking_store(uri, timeout_s=2)
    assert classify(e.value) == "unavailable"
    try:  # logging failed because of a bug, not the server: a bug
        try:
            raise KeyError("metrics")
        except KeyError as err:
            raise TrackingError("the analysis finished ... logging them to MLflow failed") from err
    except TrackingError as err:
        assert classify(err) == "bug"


def test_policy_probe_options_probe_the_version_into_the_job_run(calls, monkeypatch, tmp_path, store):
    from sae_mlops.service.policy import parse_policy

    policy = parse_policy({"rules": [{"quick": {"max_tokens": 100, "probe_options": {"datasets": "demo", "ks": "1,5"}}}]})
    assert policy.rules[0].analyses["quick"]["probe_options"] == {"datasets": "demo", "ks": "1,5"}
    for bad, msg in (({"ks": "0"}, "probe_options: --ks '0' needs whole numbers"), ({"k": "1"}, "probe_options: k is not an option"),
                     ("demo", "probe_options: expected a mapping")):
        with pytest.raises(InputError, match=msg):
            parse_policy({"rules": [{"quick": {"probe_options": bad}}]})
    probed: list = []

    def probe(target, popts, ropts):
        probed.append((target, popts, ropts, os.environ.get("MLFLOW_RUN_ID")))
        return pipeline.EvalOutcome(tmp_path, {"probe/sae_acc_k1": 0.75}, [], {}, {}, ropts.run_id)

    monkeypatch.setattr(pipeline, "run_probe_and_log", probe)
    result = job_module.run_job(_spec(tmp_path, store, options={"max_tokens": 100, "probe_options": {"datasets": "demo", "ks": "1,5"}}))
    target, popts, ropts, env_run = probed[0]
    assert target.sae == "models:/sae-a/3" and target.device == "cpu" and popts.k_values() == (1, 5)
    assert ropts.run_id == result["run_id"] == env_run  # the analysis's run, still open
    assert result["metrics"]["probe/sae_acc_k1"] == 0.75 and result["metrics"]["sparsity/l0_mean"] == 5.0
    assert "probe_options" not in vars(calls[0][1])  # not passed to the analysis
    with pytest.raises(InputError, match="probe_options in the policy"):
        job_module.run_job(_spec(tmp_path, store, options={"probe_options": {"pooling": "max"}}))


def test_a_retry_after_a_logging_outage_logs_the_finished_outputs_without_analysing(calls, tmp_path, store, monkeypatch):
    """Attempt 1 finished the analysis but the tracking server went away while it logged (its run was
    closed FAILED): the retry logs the complete files of the job's folder into its own run."""
    from sae_mlops.core.results import AnalysisResult

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    spec = _spec(tmp_path, store)
    out = Path(spec["out_dir"])
    (out / "results").mkdir(parents=True)
    result = AnalysisResult(kind="quick", params={"sae": "models:/sae-a/3"}, metrics={"sparsity/l0_mean": 7.5})
    (out / "results" / "analysis_results_x.json").write_text(result.to_json())
    (out / "SUMMARY_x.md").write_text("# done\n")
    reg = RegistryIO(store)
    failed = reg.create_job_run(EXP, "quick sae-a v3", {"sae_mlops.service.job_key": spec["job_key"]})
    reg.end_run(failed, "FAILED")
    got = job_module.run_job({**spec, "attempt": 2})
    assert calls == []  # nothing analysed again
    assert got["run_id"] != failed and got["metrics"]["sparsity/l0_mean"] == 7.5
    run = reg.client.get_run(got["run_id"])
    assert run.info.status == "FINISHED"
    assert "SUMMARY_x.md" in {a.path for a in reg.client.list_artifacts(got["run_id"])}
