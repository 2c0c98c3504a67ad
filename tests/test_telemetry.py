"""Cost telemetry: every run records where its time and memory went, in the result and in MLflow."""

from __future__ import annotations

import time

from sae_mlops.telemetry import Stages, peak_rss_mib, process_age_seconds

PASS_PARTS = ("batches", "model", "sparse_codes", "sparsity", "reconstruction", "downstream")


def test_stages_add_up_and_process_figures_are_plausible():
    s = Stages()
    for _ in range(2):
        with s.stage("a"):
            time.sleep(0.02)
    s.add("b", 1.5, 0.25)
    m = s.metrics("cpu")
    assert 0.04 <= m["time/a"] < 1.0 and m["time/b"] == 1.5 and m["time_cpu/b"] == 0.25
    assert 0 <= m["time_cpu/a"] < m["time/a"]  # sleeping costs no CPU
    assert 10 <= m["memory/peak_rss_mib"] <= peak_rss_mib()
    age = process_age_seconds()
    assert age is not None and 0 < age < 24 * 3600
    assert "memory/peak_gpu_mib" not in m


def test_quick_run_records_and_logs_its_cost(mlflow_store, demo_assets, monkeypatch):
    from mlflow.tracking import MlflowClient

    import sae_mlops.telemetry as telemetry

    monkeypatch.setattr(telemetry, "_STARTUP_COUNTED", [])  # as in a fresh process: this is its first analysis
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.workflows import run_quick_and_log

    cfg = AnalysisConfig(sae=str(demo_sae_path("batchtopk")), model="demo", max_tokens=300, progress=False, device="cpu")
    outcome = run_quick_and_log(cfg, "out")
    m, p = outcome.result.metrics, outcome.result.params
    for stage in ("import", "load", "pass", "reports", "logging", "total", "startup"):
        assert m[f"time/{stage}"] >= 0, stage
    assert m["time/logging"] > 0 and m["time/total"] > m["time/pass"] > 0
    assert 0 < m["time/pass_share"] < 1
    parts = {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("time/pass/")}
    assert set(PASS_PARTS) <= set(parts) and sum(parts.values()) <= m["time/pass"] * 1.01
    assert m["memory/peak_rss_mib"] > 100
    assert p["device_name"] and p["torch_threads"] >= 1
    run = MlflowClient().get_run(outcome.run_id)
    for key in ("time/pass", "time/import", "time/logging", "time/total", "time/pass_share", "memory/peak_rss_mib"):
        assert key in run.data.metrics, key
    assert run.data.metrics["time/total"] == round(m["time/total"], 3)  # the run page shows milliseconds
    assert not any(k.startswith("time_cpu/") for k in run.data.metrics)  # those are in timings.json
    assert run.data.params["device_name"] == p["device_name"]
    # a second analysis in the same process (demo, warm worker) paid no start-up: its total is its own
    second = run_quick_and_log(cfg, "out2").result.metrics
    assert "time/startup" not in second and 0 < second["time/pass"] < second["time/total"] < m["time/total"]
