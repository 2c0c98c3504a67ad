"""Champion/challenger gate end to end: a real `mlflow server` (sqlite, proxied artifacts, webhooks to
loopback) and `sae-mlops serve` with a gate that moves `champion` only to a significantly better
version. Three versions are registered one after the other (each analysed on the same small token
plan before the next):

1. the demo SAE with a noisy decoder: no champion yet, the bounds hold -> promoted;
2. the clean demo SAE: better explained variance and loss recovered, same L0 and dead features
   (same encoder) -> promoted, with the verdict table in its description;
3. the clean demo SAE again (identical to the champion): within noise -> held with the reason, and
   the alias stays on version 2.

Every wait is bounded; the servers are stopped (process groups) even after a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service_stack import ServiceProc, degraded_demo_sae, register_demo_version, sqlite_webhook_service, wait_quick_analysed

MODEL = "sae-gate-demo"
SECRET = "gate-test-secret"
ANALYSIS_TIMEOUT_S = 420
POLICY = (
    "rules:\n"
    f"  - models: ['{MODEL}']\n"
    "    quick: {max_tokens: 8192, batch_size: 8}\n"
    "gate:\n"
    "  analysis: quick\n"
    "  alias: champion\n"
    "  min: {loss_recovered: 0.0}\n"
    "  better: [explained_variance, loss_recovered]\n"
    "  guard: [dead_fraction, l0]\n"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    with sqlite_webhook_service(tmp, SECRET, POLICY, "service-gate") as (uri, service):
        yield {"uri": uri, "service": service, "tmp": tmp}


def _analysed(client, service: ServiceProc, version: str) -> dict[str, str]:
    """The version's tags once its quick analysis is done and the gate has decided."""
    return wait_quick_analysed(client, service, MODEL, version, ANALYSIS_TIMEOUT_S)


def test_champion_moves_only_to_a_significantly_better_version(stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["uri"], registry_uri=stack["uri"])
    service: ServiceProc = stack["service"]
    noisy = degraded_demo_sae(Path(stack["tmp"]) / "noisy-sae")

    v1 = register_demo_version(client, MODEL, noisy)
    tags = _analysed(client, service, v1)
    assert tags["sae_mlops.gate"] == "promoted", tags
    assert "no version holds champion yet" in tags["sae_mlops.gate_reason"]
    assert tags["sae_mlops.gate_reference"] == "none" and tags["sae_mlops.analysis.gate"] == "passed"
    assert client.get_model_version_by_alias(MODEL, "champion").version == v1

    v2 = register_demo_version(client, MODEL)
    tags = _analysed(client, service, v2)
    assert tags["sae_mlops.gate"] == "promoted", tags
    assert tags["sae_mlops.gate_reference"] == f"{MODEL} v{v1}"
    assert tags["sae_mlops.gate_reason"].startswith(f"against v{v1}: significantly better on explained_variance, "
                                                    "loss_recovered, not worse on dead_fraction, l0")
    assert client.get_model_version_by_alias(MODEL, "champion").version == v2
    description = client.get_model_version(MODEL, v2).description
    assert "<!-- sae-mlops gate -->" in description and "**Gate (champion): promoted.**" in description
    rows = {line.split("|")[1].strip(): line for line in description.splitlines() if line.startswith("| ")}
    assert "| better |" in rows["explained variance"]
    assert "| better |" in rows["loss recovered"]
    assert "| within noise |" in rows["dead fraction"]  # same encoder: identical firing
    assert "| within noise |" in rows["L0 mean"]

    v3 = register_demo_version(client, MODEL)  # identical to the champion
    tags = _analysed(client, service, v3)
    assert tags["sae_mlops.gate"] == "held", tags
    assert tags["sae_mlops.analysis.gate"] == "failed"
    assert tags["sae_mlops.gate_reason"].startswith(
        f"against v{v2}: not significantly better on explained_variance (within noise, sampling bound), "
        "loss_recovered (within noise, sampling bound)"), tags["sae_mlops.gate_reason"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == v2
    held = client.get_model_version(MODEL, v3).description
    assert "**Gate (champion): held.**" in held and "| better |" not in held and "| worse |" not in held
    # the champion's own description was not touched by the held challenger
    assert client.get_model_version(MODEL, v2).description == description


@pytest.fixture(scope="module")
def block_sums(tmp_path_factory):
    """Per-block sums of quick analyses (in process, no MLflow): the demo SAE and its noisy-decoder copy
    on one plan of 4096 tokens, and the demo SAE on another plan (2048 tokens)."""
    from sae_mlops.analyses.quick import run_quick
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path

    noisy = degraded_demo_sae(tmp_path_factory.mktemp("noisy") / "sae")
    clean = str(demo_sae_path("saelens"))

    def sums(sae: str, tokens: int):
        return run_quick(AnalysisConfig(sae=sae, max_tokens=tokens, batch_size=8, device="cpu", progress=False)).block_sums

    return {"clean": sums(clean, 4096), "noisy": sums(str(noisy), 4096), "other_plan": sums(clean, 2048)}


def test_challenge_decisions(block_sums):
    """better -> promoted; identical -> held (within noise); worse on a guard metric -> held; another
    token plan -> held, naming what differs; the table has a row per judged metric."""
    from sae_mlops.service.gate import challenge, gate_section

    clean, noisy = block_sums["clean"], block_sums["noisy"]
    up = challenge(clean, noisy, "1", ["loss_recovered"], ["l0"], resamples=2000)
    assert up.promoted and up.reference == "v1" and up.reason.startswith("against v1: significantly better on loss_recovered")
    assert [r.metric for r in up.rows] == ["downstream/loss_recovered", "sparsity/l0_mean"]
    assert [r.verdict for r in up.rows] == ["better", "within noise"] and all(r.paired for r in up.rows)
    same = challenge(clean, clean, "2", ["loss_recovered"], [], resamples=2000)
    assert not same.promoted and "not significantly better on loss_recovered (within noise, sampling bound)" in same.reason
    assert same.rows[0].diff == 0.0 and same.rows[0].p_holm == 1.0
    down = challenge(noisy, clean, "2", ["l0"], ["explained_variance"], resamples=2000)
    assert not down.promoted and "significantly worse on explained_variance" in down.reason
    other = challenge(clean, block_sums["other_plan"], "3", ["loss_recovered"], [])
    assert not other.promoted and not other.rows
    assert "different token plans (max_tokens: 4096 vs 2048" in other.reason
    md = up.markdown("champion", "4")
    assert md.startswith("**Gate (champion): promoted.**") and "| metric | v1 | v4 |" in md
    # the description keeps what the user wrote and replaces only the gate's own section
    first = gate_section("Trained on the demo corpus.", md)
    again = gate_section(first, same.markdown("champion", "4"))
    assert again.startswith("Trained on the demo corpus.\n\n<!-- sae-mlops gate -->") and "held" in again
    assert again.count("<!-- sae-mlops gate -->") == 1 and "promoted" not in again
