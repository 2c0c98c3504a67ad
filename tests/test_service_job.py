"""The job process entry (`python -m sae_mlops.service.job`), with the analysis calls replaced by fakes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sae_mlops import pipeline
from sae_mlops.errors import InputError
from sae_mlops.service import job as job_module
from sae_mlops.service.mlflow_io import RegistryIO


@dataclass
class _Result:
    metrics: dict = field(default_factory=dict)


@dataclass
class _Outcome:
    run_id: str
    result: _Result
    warnings: list = field(default_factory=list)


@pytest.fixture
def calls(monkeypatch):
    seen: list = []

    def quick(cfg, out_dir, *, track, experiment, run_name):
        seen.append(("quick", cfg, out_dir, track, experiment, run_name))
        return _Outcome("run-q", _Result({"sparsity/l0_mean": 5.0, "downstream/loss_recovered": float("nan")}), ["few tokens"])

    def full(cfg, out_dir, *, opts, track, experiment, run_name):
        seen.append(("full", cfg, out_dir, opts, experiment, run_name))
        return _Outcome("run-f", _Result({"features/dead_fraction": 0.1}))

    monkeypatch.setattr(pipeline, "run_quick_and_log", quick)
    monkeypatch.setattr(pipeline, "run_full_and_log", full)
    monkeypatch.setattr(RegistryIO, "__init__", lambda self, uri=None: None)
    monkeypatch.setattr(RegistryIO, "tag_run", lambda self, run_id, tags: seen.append(("tag_run", run_id, dict(tags))))
    return seen


def _spec(tmp_path: Path, **kw) -> dict:
    spec = {
        "job_id": 7, "model_name": "sae-a", "version": "3", "kind": "quick", "options": {"max_tokens": 100, "batch_size": 4},
        "trigger": "model_version.created", "device": "cpu", "experiment": "exp", "tracking_uri": None,
        "out_dir": str(tmp_path / "out"), "result_path": str(tmp_path / "result.json"), "log_format": "json", "log_level": "INFO",
    }
    spec.update(kw)
    return spec


def test_quick_job_analyses_the_version_and_tags_the_run(calls, tmp_path):
    result = job_module.run_job(_spec(tmp_path))
    kind, cfg, out_dir, track, experiment, run_name = calls[0]
    assert kind == "quick" and track and experiment == "exp" and run_name == "quick sae-a v3"
    assert cfg.sae == "models:/sae-a/3" and cfg.device == "cpu" and cfg.progress is False
    assert cfg.max_tokens == 100 and cfg.batch_size == 4 and out_dir == tmp_path / "out"
    assert calls[1] == ("tag_run", "run-q", {"sae_mlops.service.job_id": "7", "sae_mlops.service.trigger": "model_version.created"})
    assert result == {"job_id": 7, "kind": "quick", "run_id": "run-q", "metrics": {"sparsity/l0_mean": 5.0}, "warnings": ["few tokens"]}


def test_full_job_passes_full_options(calls, tmp_path):
    job_module.run_job(_spec(tmp_path, kind="full", options={"max_tokens": 50, "full_options": {"examples_per_feature": 3}}))
    kind, cfg, _, opts, _, run_name = calls[0]
    assert kind == "full" and run_name == "full sae-a v3" and cfg.max_tokens == 50
    assert opts.examples_per_feature == 3
    calls.clear()
    job_module.run_job(_spec(tmp_path, kind="full", options={}))
    assert calls[0][3] is None  # the library defaults


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"options": {"max_tokenz": 1}}, "AnalysisConfig does not take"),
        ({"kind": "full", "options": {"full_options": {"bogus": 1}}}, "full analysis does not take"),
        ({"kind": "medium"}, "Unknown analysis kind"),
    ],
)
def test_bad_specs_are_input_errors(calls, tmp_path, kw, words):
    with pytest.raises(InputError, match=words):
        job_module.run_job(_spec(tmp_path, **kw))


def test_main_exit_codes_and_result_file(calls, tmp_path, monkeypatch):
    import sae_mlops.service.logs as logs

    # Not in the test process: PR_SET_PDEATHSIG and the service's root-logger setup.
    monkeypatch.setattr(job_module, "_die_with_parent", lambda: None)
    monkeypatch.setattr(logs, "setup_service_logging", lambda *a, **k: None)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec(tmp_path)))
    assert job_module.main([str(spec_path)]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["run_id"] == "run-q"

    spec_path.write_text(json.dumps(_spec(tmp_path, kind="medium", result_path=str(tmp_path / "r2.json"))))
    assert job_module.main([str(spec_path)]) == job_module.EXIT_INPUT_ERROR
    assert not (tmp_path / "r2.json").exists()

    def boom(*a, **k):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(pipeline, "run_quick_and_log", boom)
    spec_path.write_text(json.dumps(_spec(tmp_path, result_path=str(tmp_path / "r3.json"))))
    assert job_module.main([str(spec_path)]) == job_module.EXIT_FAILED
    assert not (tmp_path / "r3.json").exists()
    assert job_module.main([]) == job_module.EXIT_INPUT_ERROR
