"""Policy matching (models, aliases, tags, own-write loops), loading errors and the quality gate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sae_mlops.errors import InputError
from sae_mlops.service.policy import Gate, default_policy, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[1]

POLICY = {
    "rules": [
        {"models": ["sae-*"], "triggers": {"created": True, "tags": {"analyze": "*"}}, "quick": {"max_tokens": 5000}},
        {"models": ["sae-*"], "triggers": {"created": False, "aliases": ["candidate", "rc-*"]}, "full": {"max_tokens": 9000}},
        {"models": ["exp/*"], "triggers": {"created": True}, "quick": None, "full": True},
    ],
    "defaults": {"quick": {"batch_size": 8}, "full": {"batch_size": 4}},
    "gate": {"analysis": "quick", "alias": "approved", "min": {"loss_recovered": 0.8}, "max": {"dead_fraction": 0.2}},
}


@pytest.fixture
def policy():
    return parse_policy(POLICY)


def test_created_event_matches_model_glob(policy):
    d = policy.decide("model_version.created", {"name": "sae-gpt2-l8", "version": "3"})
    assert d.ignored is None
    (r,) = d.requests
    assert (r.model_name, r.version, r.kind, r.trigger, r.force) == ("sae-gpt2-l8", "3", "quick", "model_version.created", False)
    assert r.options == {"batch_size": 8, "max_tokens": 5000}  # defaults, then the rule's own


def test_unmatched_model_is_ignored(policy):
    d = policy.decide("model_version.created", {"name": "resnet", "version": "1"})
    assert d.requests == [] and "no rule" in d.ignored


def test_rule_can_request_both_kinds(policy):
    d = policy.decide("model_version.created", {"name": "exp/x", "version": "1"})
    assert [r.kind for r in d.requests] == ["quick", "full"]
    assert d.requests[1].options == {"batch_size": 4}


def test_alias_trigger(policy):
    d = policy.decide("model_version_alias.created", {"name": "sae-a", "alias": "rc-2", "version": "7"})
    (r,) = d.requests
    assert r.kind == "full" and r.trigger == "alias:rc-2" and not r.force and r.options["max_tokens"] == 9000
    assert policy.decide("model_version_alias.created", {"name": "sae-a", "alias": "prod", "version": "7"}).ignored


def test_tag_trigger_forces_a_new_analysis(policy):
    (r,) = policy.decide("model_version_tag.set", {"name": "sae-a", "version": "2", "key": "analyze", "value": "yes"}).requests
    assert r.force and r.trigger == "tag:analyze=yes"
    assert policy.decide("model_version_tag.set", {"name": "sae-a", "version": "2", "key": "owner", "value": "x"}).ignored


def test_own_writes_never_trigger(policy):
    for key in ("sae_mlops.analysis.quick.status", "sae_mlops.analysis.gate", "sae_mlops.latest_analysis_run_id"):
        d = policy.decide("model_version_tag.set", {"name": "sae-a", "version": "1", "key": key, "value": "done"})
        assert d.requests == [] and "sae-mlops" in d.ignored
    d = policy.decide("model_version_alias.created", {"name": "sae-a", "alias": "approved", "version": "1"})
    assert d.requests == [] and "sae-mlops" in d.ignored


def test_other_events_and_bad_payloads_are_ignored(policy):
    assert policy.decide("registered_model.created", {"name": "sae-a"}).ignored
    assert policy.decide("model_version.created", {"name": "sae-a"}).ignored


def test_for_version_is_what_the_reconciler_asks(policy):
    # created: every version; the alias rule only when the version carries the alias now.
    reqs = policy.for_version("sae-a", "4", tags={}, aliases=[])
    assert [(r.kind, r.trigger) for r in reqs] == [("quick", "reconcile")]
    reqs = policy.for_version("sae-a", "4", tags={}, aliases=["candidate"])
    assert sorted(r.kind for r in reqs) == ["full", "quick"]
    assert policy.for_version("other", "1", {}, []) == []


def test_webhook_events_follow_the_triggers(policy):
    assert policy.webhook_events() == ["model_version.created", "model_version_alias.created", "model_version_tag.set"]
    assert default_policy().webhook_events() == ["model_version.created"]


def test_default_policy_quick_on_every_new_version():
    p = load_policy()
    (r,) = p.decide("model_version.created", {"name": "anything", "version": "1"}).requests
    assert r.kind == "quick" and r.options == {} and p.gate is None


def test_example_policy_file_loads():
    p = load_policy(ROOT / "deploy" / "policy.example.yaml")
    assert p.gate is not None and p.gate.alias == "approved"
    assert p.decide("model_version.created", {"name": "sae-x", "version": "1"}).requests[0].kind == "quick"


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("rules:\n  - models: m*\n    triggers: {aliases: [cand]}\n    quick: {max_tokens: 100}\n")
    p = load_policy(y)
    assert p.rules[0].models == ["m*"] and not p.rules[0].on_created
    j = tmp_path / "p.json"
    j.write_text('{"rules": [{"quick": {}}]}')
    assert load_policy(j).rules[0].models == ["*"]


@pytest.mark.parametrize(
    "data, words",
    [
        ({"rules": [{"quick": {"sae": "x"}}]}, "set by the service"),
        ({"rules": [{"quick": {"device": "cuda"}}]}, "set by the service"),
        ({"rules": [{"quick": {"max_tokenz": 1}}]}, "unknown option"),
        ({"rules": [{"quick": {"max_tokens": -5}}]}, "max-tokens must be at least 1"),
        ({"rules": [{"quick": {"max_tokens": 1.5}}]}, "valid integer"),
        ({"rules": [{"quick": {"topk_mode": "sometimes"}}]}, "topk-mode must be one of batch, threshold"),
        ({"rules": [{"full": {"full_options": {"neighbours": 0}}}]}, "full_options: --neighbours must be at least 1"),
        ({"rules": [{"full": {"full_options": {"neighbors": 8}}}]}, "full_options: neighbors is not an option"),
        ({"rules": [{"models": []}]}, "model-name globs"),
        ({"rules": [{"triggers": {"created": True}}]}, "runs no analysis"),
        ({"rules": [{"triggers": {"created": False}, "quick": {}}]}, "no trigger"),
        ({"rules": [{"triggers": {"tags": {"sae_mlops.x": "*"}}, "quick": {}}]}, "written by sae-mlops"),
        ({"rules": [{"on": {"created": True}, "quick": {}}]}, "unknown key"),
        ({"rules": [{"triggers": {"aliases": ["approved"]}, "quick": {}}], "gate": {"alias": "approved"}}, "would trigger"),
        ({"gate": {"min": {"l0": "big"}}}, "expected a number"),
        ({"gate": {"analysis": "medium"}}, "unknown analysis kind"),
        ({"gate": {"alias": "3"}}, "not a number"),
        ({"rules": []}, "non-empty list"),
        ({"rulez": []}, "unknown key"),
        ({"defaults": {"slow": {}}}, "unknown analysis kind"),
        (["not", "a", "mapping"], "mapping"),
    ],
)
def test_malformed_policies_raise_one_clear_error(data, words):
    with pytest.raises(InputError) as e:
        parse_policy(data, source="p.yaml")
    assert words in str(e.value) and "p.yaml" in str(e.value)


def test_unreadable_or_invalid_policy_file(tmp_path):
    with pytest.raises(InputError, match="cannot be read"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(InputError, match="not valid"):
        load_policy(bad)


# --- quality gate ----------------------------------------------------------------------------------

METRICS = {
    "downstream/loss_recovered": 0.91,
    "features/dead_fraction": 0.05,
    "sparsity/l0_mean": 40.0,
    "recon/explained_variance": 0.7,
    "recon/cosine": 0.95,
}


def test_gate_passes_when_every_bound_holds():
    g = Gate(min={"loss_recovered": 0.8, "explained_variance": 0.6}, max={"dead_fraction": 0.2, "l0": 64})
    r = g.evaluate(METRICS)
    assert r.passed and r.reasons == [] and r.values["l0"] == 40.0 and r.summary() == "all bounds hold"


def test_gate_reports_each_violated_bound():
    g = Gate(min={"loss_recovered": 0.95, "recon/cosine": 0.99}, max={"dead_fraction": 0.01})
    r = g.evaluate(METRICS)
    assert not r.passed
    assert r.reasons == ["dead_fraction 0.05 > 0.01", "loss_recovered 0.91 < 0.95", "recon/cosine 0.95 < 0.99"]


@pytest.mark.parametrize("value", [None, math.nan, math.inf, "n/a"])
def test_gate_fails_on_missing_or_non_finite_metrics(value):
    g = Gate(min={"loss_recovered": 0.5})
    r = g.evaluate({**METRICS, "downstream/loss_recovered": value})
    assert not r.passed and r.reasons == ["loss_recovered is missing"]


def test_gate_bounds_are_inclusive():
    assert Gate(min={"loss_recovered": 0.91}, max={"dead_fraction": 0.05}).evaluate(METRICS).passed


def test_parsed_gate():
    p = parse_policy(POLICY)
    assert p.gate.metric_names() == ["dead_fraction", "loss_recovered"]
    assert p.gate.evaluate(METRICS).passed
    assert not p.gate.evaluate({**METRICS, "features/dead_fraction": 0.3}).passed


def test_policy_schema_refuses_unknown_keys_everywhere_and_describes_every_key():
    from sae_mlops.service.policy import GateSpec, PolicySpec, RuleSpec, TriggersSpec

    for model in (PolicySpec, RuleSpec, TriggersSpec, GateSpec):
        for name, f in model.model_fields.items():
            assert f.description and len(f.description) > 15, (model.__name__, name)
    cases = [
        ({"rules": [{"quick": {}}], "gates": {}}, "the top level", "['gates']"),
        ({"rules": [{"quick": {}, "model": "x"}]}, "rules[0]", "['model']"),
        ({"rules": [{"quick": {}}, {"quick": {}, "triggers": {"create": True}}]}, "rules[1].triggers", "['create']"),
        ({"gate": {"analysis": "quick", "minimum": {}}}, "gate", "['minimum']"),
    ]
    for data, where, key in cases:
        with pytest.raises(InputError) as e:
            parse_policy(data, source="p.yaml")
        assert f"In p.yaml, {where}: unknown key(s) {key}" in str(e.value), str(e.value)


def test_champion_challenger_gate_options():
    p = load_policy(ROOT / "deploy" / "policy.example.yaml")
    assert p.gate.challenges and p.gate.better == ["loss_recovered"] and p.gate.alpha == 0.05
    assert p.gate.guard == ["explained_variance", "dead_fraction"]
    g = parse_policy({"gate": {"alias": "champion", "better": "kl_score"}}).gate
    assert g.better == ["kl_score"] and g.guard == [] and g.challenges
    assert not parse_policy({"gate": {"alias": "champion", "min": {"l0": 1}}}).gate.challenges
    for data, words in [
        ({"gate": {"better": ["loss_recovered"]}}, "gate.alias: better/guard compare"),
        ({"gate": {"alias": "c", "better": ["stats/blocks"]}}, "gate.better: metric stats/blocks has no better direction"),
        ({"gate": {"alias": "c", "guard": ["l00"]}}, "gate.guard: unknown metric 'l00'"),
        ({"gate": {"alias": "c", "guard": [3]}}, "gate.guard: expected a list of metric names"),
        ({"gate": {"alias": "c", "better": ["l0"], "alpha": 0.9}}, "gate.alpha: expected a number in (0, 0.5]"),
    ]:
        with pytest.raises(InputError) as e:
            parse_policy(data, source="p.yaml")
        assert words in str(e.value), str(e.value)
