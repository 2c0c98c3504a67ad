"""The policy's ``probe_options`` end to end: a real `mlflow server` (sqlite, proxied artifacts,
webhooks to loopback) and `sae-mlops serve` with a rule that probes each new version on the demo's
offline labelled tasks after its quick analysis.

Registering the demo SAE as a version triggers one job; its quick analysis run (the run linked to the
version by ``sae_mlops.analysis.quick.run_id``) must also hold what `sae-mlops probe` logs: the
averaged and per-dataset ``probe/...`` metrics, ``time/eval_probe``, the ``sae_mlops.evals`` tag and
the files under ``evals/``. The values are checked against `sae-mlops probe` run here, in process and
untracked, on the same SAE directory with the same options and the service's activation cache (three
hits: the service's model pass was cached under the same keys, and the probes agree).

Every wait is bounded; the servers are stopped (process groups) even after a failure.
"""

from __future__ import annotations


import pytest

from service_stack import ServiceProc, register_demo_version, sqlite_webhook_service, wait_quick_analysed

MODEL = "sae-probe-demo"
SECRET = "probe-test-secret"
ANALYSIS_TIMEOUT_S = 420
KS = "1,5"
DEMO_TASKS = ("demo_doctest", "demo_returns", "demo_topic")


def _policy(cache_dir: str) -> str:
    return (
        "rules:\n"
        f"  - models: ['{MODEL}']\n"
        f"    quick: {{max_tokens: 1024, batch_size: 8, probe_options: {{datasets: demo, ks: '{KS}', cache_dir: '{cache_dir}'}}}}\n"
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe_service")
    cache = tmp / "activation-cache"
    with sqlite_webhook_service(tmp, SECRET, _policy(str(cache)), "service-probe") as (uri, service):
        yield {"uri": uri, "service": service, "tmp": tmp, "cache": cache}


def _analysed(client, service: ServiceProc, version: str) -> dict[str, str]:
    return wait_quick_analysed(client, service, MODEL, version, ANALYSIS_TIMEOUT_S)


def test_policy_probe_options_log_probe_metrics_into_the_versions_analysis_run(stack):
    from mlflow.tracking import MlflowClient

    from sae_mlops import workflows as pipeline
    from sae_mlops.config import EvalRunOptions, EvalTarget, ProbeOptions
    from sae_mlops.demo import demo_sae_path

    client = MlflowClient(tracking_uri=stack["uri"], registry_uri=stack["uri"])
    service: ServiceProc = stack["service"]
    version = register_demo_version(client, MODEL)
    tags = _analysed(client, service, version)
    jobs = [j for j in service.jobs() if j["version"] == version]
    assert len(jobs) == 1 and jobs[0]["state"] == "done", jobs

    run_id = tags["sae_mlops.analysis.quick.run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sae_mlops.source_uri"] == f"models:/{MODEL}/{version}"
    assert "probe" in run.data.tags["sae_mlops.evals"].split(",")
    m = run.data.metrics
    assert "downstream/loss_recovered" in m and "sparsity/l0_mean" in m  # the analysis and the probe share the run
    assert m["probe/datasets"] == 3 and m["probe/tasks"] == 7  # 2 binary tasks + 5 one-vs-rest topics
    assert m["time/eval_probe"] > 0
    assert run.data.params["probe_ks"] == KS and run.data.params["probe_datasets"] == "demo"
    names = ["sae_acc_k1", "sae_acc_k5", "sae_auc_k1", "sae_auc_k5", "raw_acc_k1", "raw_acc_k5", "dense_acc", "dense_auc"]
    for name in names:
        assert f"probe/{name}" in m, sorted(k for k in m if k.startswith("probe/"))
        for task in DEMO_TASKS:
            assert f"probe/{task}/{name}" in m, sorted(k for k in m if k.startswith("probe/"))
    assert not any(k.startswith("probe/sae_acc_k") and k.split("_k")[1].split("_")[0] not in ("1", "5") for k in m)
    artifacts = {f.path for f in client.list_artifacts(run_id, "evals")}
    assert {"evals/EVALS.md", "evals/evals.json", "evals/probe"} <= artifacts, artifacts
    probe_files = {f.path for f in client.list_artifacts(run_id, "evals/probe")}
    assert "evals/probe/probe_accuracy_vs_k.png" in probe_files, probe_files

    # The same probing in this process, untracked, on the SAE's directory: the service's cache is hit
    # for every dataset (same model, hook, data and pooling), and the logged values are the probe's.
    local = pipeline.run_probe_and_log(
        EvalTarget(sae=str(demo_sae_path("saelens")), batch_size=8, device="cpu"),
        ProbeOptions(datasets="demo", ks=KS, cache_dir=str(stack["cache"])),
        EvalRunOptions(out=str(stack["tmp"] / "local-probe"), no_track=True, quiet=True),
    )
    assert (local.cache_hits, local.cache_misses) == (3, 0)
    for key, value in local.metrics.items():
        if key.startswith("probe/"):
            assert m[key] == pytest.approx(value, abs=1e-6), key
    # the version's job result carries the probe metrics too
    assert service.job(jobs[0]["id"])["result"]["metrics"]["probe/sae_acc_k5"] == pytest.approx(m["probe/sae_acc_k5"])
