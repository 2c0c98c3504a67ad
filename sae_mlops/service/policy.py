"""Which registry events trigger which analyses, and the quality gate.

A policy file (YAML or JSON)::

    rules:                       # checked in order; for an event, the first rule that accepts it wins
      - models: ["sae-*"]        # fnmatch globs on the registered model name (default: ["*"])
        triggers:
          created: true          # model_version.created (default: true unless aliases/tags are given)
          aliases: [candidate]   # model_version_alias.created for these aliases (globs; default: none)
          tags: {analyze: "*"}   # model_version_tag.set for these keys, value glob (default: none)
        quick: {max_tokens: 200000}          # run a quick analysis with these options
        full: {max_tokens: 1000000}          # and/or a full one (absent or false: not run)
    defaults:                    # options for every rule, per kind (a rule's own options win)
      quick: {batch_size: 16}
    gate:                        # optional quality gate on one analysis kind
      analysis: quick
      alias: approved            # set on the version when every bound holds
      min: {loss_recovered: 0.8, explained_variance: 0.6}
      max: {dead_fraction: 0.2}
      better: [loss_recovered]   # champion/challenger: the alias moves only when the version is
      guard: [l0, dead_fraction] # significantly better than its current holder on every `better`
      alpha: 0.05                # metric and not significantly worse on any `guard` metric

Analysis options are `sae_mlops.config.AnalysisConfig` fields (``max_tokens``, ``model``,
``corpus``, ``text_field``, ``hook``, ``context_size``, ``batch_size``, ``prepend_bos``, ``dtype``,
``topk_mode``...); ``sae`` is the version (``models:/<name>/<version>``) and ``device`` the worker's
device. A full analysis also takes ``full_options`` (a mapping passed to the full analysis). Either kind
takes ``probe_options`` (`sae_mlops.config.ProbeOptions` fields, e.g. ``{datasets: "topics=/data/t.jsonl"}``):
k-sparse probing of the version after the analysis, logged into the analysis's run.

Without a policy file the default applies: a quick analysis, with the library defaults, of every
new version of every registered model, and no gate.

The file's keys are pydantic models (`PolicySpec`, `RuleSpec`, `TriggersSpec`, `GateSpec`: each
field described, unknown keys refused); the values are checked by `parse_policy`, which names the
entry and the fix in one sentence.

With ``better`` and/or ``guard`` the gate is a champion/challenger gate (`sae_mlops.service.gate`):
the version's analysis is judged against the analysis of the version holding ``alias`` on the same
token plan (`sae_mlops.core.verdicts.judge`: paired block-bootstrap differences, Holm over the
gate's metrics at ``alpha``); the first version (no holder yet) takes the alias when the bounds hold.
The decision (``sae_mlops.gate`` = promoted | held, ``sae_mlops.gate_reason``) and the verdict table
go to the version's tags and description.

Loops are impossible by construction: tag events for ``sae_mlops.*`` keys (the service's own
write-back) and alias events for the gate's alias are ignored, and a rule may not trigger on the
gate's alias.

A tag trigger is an explicit request: it runs the analysis again even when one is done (not while
one is queued or running). Created and alias triggers run it only when the version has none yet.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_mlops.errors import InputError
from sae_mlops.service import tags as T

ANALYSIS_KINDS = ("quick", "full")
EVENT_CREATED = "model_version.created"
EVENT_ALIAS = "model_version_alias.created"
EVENT_TAG = "model_version_tag.set"
EVENTS = (EVENT_CREATED, EVENT_ALIAS, EVENT_TAG)

# AnalysisConfig fields a policy may not set (the service sets them) or that make no sense here.
_RESERVED_OPTIONS = {"sae", "sae_id", "device", "progress", "extra"}


@dataclass(frozen=True)
class JobRequest:
    """One analysis to enqueue."""

    model_name: str
    version: str
    kind: str
    options: dict[str, Any]
    trigger: str
    force: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model_name, self.version, self.kind)


@dataclass(frozen=True)
class Decision:
    """What the policy says about one webhook event: jobs to enqueue, or why it is ignored."""

    requests: list[JobRequest]
    ignored: str | None = None


@dataclass
class Rule:
    models: list[str] = field(default_factory=lambda: ["*"])
    on_created: bool = True
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    analyses: dict[str, dict[str, Any]] = field(default_factory=lambda: {"quick": {}})

    def matches_model(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.models)

    def matches_alias(self, alias: str) -> bool:
        return any(fnmatch.fnmatchcase(alias, g) for g in self.aliases)

    def matches_tag(self, key: str, value: str) -> bool:
        return any(
            fnmatch.fnmatchcase(key, k) and fnmatch.fnmatchcase(value or "", v) for k, v in self.tags.items()
        )


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]
    values: dict[str, float | None]

    def summary(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "all bounds hold"


@dataclass
class Gate:
    """Bounds on an analysis' metrics; `alias` is set on the version when all of them hold.

    Metric names are short names (``loss_recovered``, ``l0``, ``explained_variance``,
    ``dead_fraction``, ``kl_score``, ``cosine``...) or result metric names (``recon/cosine``).
    A missing or non-finite metric fails the gate.
    """

    analysis: str = "quick"
    alias: str | None = None
    min: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    better: list[str] = field(default_factory=list)  # champion/challenger: significantly better on each
    guard: list[str] = field(default_factory=list)  # ... and not significantly worse on any
    alpha: float = 0.05  # family-wise error rate of the verdicts (Holm)

    @property
    def challenges(self) -> bool:
        """True when the alias moves only to a version that beats its current holder."""
        return bool(self.alias and (self.better or self.guard))

    def metric_names(self) -> list[str]:
        return sorted({*self.min, *self.max})

    def evaluate(self, metrics: Mapping[str, Any]) -> GateResult:
        reasons: list[str] = []
        values: dict[str, float | None] = {}
        for name in self.metric_names():
            value = finite(metrics.get(T.metric_name(name)))
            values[name] = value
            if value is None:
                reasons.append(f"{name} is missing")
                continue
            lo, hi = self.min.get(name), self.max.get(name)
            if lo is not None and value < lo:
                reasons.append(f"{name} {value:.6g} < {lo:g}")
            if hi is not None and value > hi:
                reasons.append(f"{name} {value:.6g} > {hi:g}")
        return GateResult(passed=not reasons, reasons=reasons, values=values)


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=lambda: [Rule()])
    gate: Gate | None = None
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "default policy"

    # --- events ---------------------------------------------------------------------------

    def decide(self, event: str, data: Mapping[str, Any]) -> Decision:
        """The jobs a webhook event asks for (`event` is ``<entity>.<action>``, `data` its payload)."""
        if event not in EVENTS:
            return Decision([], ignored=f"event {event} is not handled")
        name = str(data.get("name") or "")
        version = str(data.get("version") or "")
        if not name or not version:
            return Decision([], ignored=f"{event} payload has no model name or version")
        if event == EVENT_TAG:
            key, value = str(data.get("key") or ""), str(data.get("value") or "")
            if T.is_own_tag(key):
                return Decision([], ignored=f"tag {key} is written by sae-mlops")
            rule = self._first(name, lambda r: r.matches_tag(key, value))
            trigger, force = f"tag:{key}={value}", True
        elif event == EVENT_ALIAS:
            alias = str(data.get("alias") or "")
            if self.gate is not None and alias == self.gate.alias:
                return Decision([], ignored=f"alias {alias} is set by sae-mlops")
            rule = self._first(name, lambda r: r.matches_alias(alias))
            trigger, force = f"alias:{alias}", False
        else:
            rule = self._first(name, lambda r: r.on_created)
            trigger, force = EVENT_CREATED, False
        if rule is None:
            return Decision([], ignored=f"no rule for {name} on {trigger}")
        return Decision(self._requests(rule, name, version, trigger, force))

    def for_version(self, name: str, version: str, tags: Mapping[str, str], aliases: Iterable[str]) -> list[JobRequest]:
        """What the policy wants analysed for an existing version (the reconciler's question).

        A rule applies when it matches the model and one of its triggers holds now: ``created``
        (always, the version exists), an alias the version has, or a tag it carries. For each
        analysis kind, the first applicable rule that runs it gives the options.
        """
        aliases = list(aliases)
        out: dict[str, JobRequest] = {}
        for rule in self.rules:
            if not rule.matches_model(name):
                continue
            if rule.on_created:
                trigger = "reconcile"
            elif any(rule.matches_alias(a) for a in aliases):
                trigger = "reconcile:alias"
            elif any(rule.matches_tag(k, v) for k, v in tags.items() if not T.is_own_tag(k)):
                trigger = "reconcile:tag"
            else:
                continue
            for req in self._requests(rule, name, version, trigger, False):
                out.setdefault(req.kind, req)
        return list(out.values())

    def model_globs(self) -> list[str]:
        return sorted({g for r in self.rules for g in r.models})

    def matches_model(self, name: str) -> bool:
        return any(r.matches_model(name) for r in self.rules)

    def webhook_events(self) -> list[str]:
        """The MLflow webhook events this policy needs."""
        events = []
        if any(r.on_created for r in self.rules):
            events.append(EVENT_CREATED)
        if any(r.aliases for r in self.rules):
            events.append(EVENT_ALIAS)
        if any(r.tags for r in self.rules):
            events.append(EVENT_TAG)
        return events or [EVENT_CREATED]

    def _first(self, name: str, accepts) -> Rule | None:
        for rule in self.rules:
            if rule.matches_model(name) and accepts(rule):
                return rule
        return None

    def _requests(self, rule: Rule, name: str, version: str, trigger: str, force: bool) -> list[JobRequest]:
        out = []
        for kind in ANALYSIS_KINDS:
            if kind not in rule.analyses:
                continue
            options = {**self.defaults.get(kind, {}), **rule.analyses[kind]}
            out.append(JobRequest(name, version, kind, options, trigger, force))
        return out


# --- loading -------------------------------------------------------------------------------------


def default_policy() -> Policy:
    return Policy()


def load_policy(path: str | Path | None = None, data: Mapping[str, Any] | None = None) -> Policy:
    """The policy from a YAML/JSON file, or from an already parsed mapping, else the default.

    Raises InputError naming the file and the entry for anything malformed.
    """
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"The policy file {p} cannot be read ({e.strerror}); check SAE_MLOPS_POLICY_FILE / --policy.") from None
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"The policy file {p} is not valid YAML/JSON ({e}); fix its syntax.") from None
        return parse_policy(data or {}, source=str(p))
    if data is not None:
        return parse_policy(data, source="the inline policy")
    return default_policy()


# --- the file's schema (pydantic: unknown keys refused; the checks below give the sentences) ---------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggersSpec(_Spec):
    """``rules[i].triggers``."""

    created: Any = Field(None, description="true: run on model_version.created (every new version). "
                         "Default: true unless aliases or tags are given.")
    aliases: Any = Field(None, description="Alias globs: run on model_version_alias.created for a matching alias "
                         "(a string or a list). Default: none.")
    tags: Any = Field(None, description="Tag key -> value glob (or a list of keys, any value): run on "
                      "model_version_tag.set for a matching tag; keys sae_mlops.* are refused. Default: none.")


class RuleSpec(_Spec):
    """One entry of ``rules``."""

    models: Any = Field(["*"], description="fnmatch globs on the registered model name (a string or a list). Default [\"*\"].")
    triggers: Any = Field(None, description="When the rule fires: created, aliases, tags (TriggersSpec). Default: created.")
    quick: Any = Field(None, description="Run a quick analysis with these AnalysisConfig options (a mapping; {} or "
                       "true: defaults; absent or false: not run).")
    full: Any = Field(None, description="Run a full analysis with these options (AnalysisConfig fields and "
                      "full_options); absent or false: not run.")


class GateSpec(_Spec):
    """``gate``: bounds on one analysis kind's metrics."""

    analysis: Any = Field("quick", description="The analysis kind the gate reads: quick or full. Default quick.")
    alias: Any = Field(None, description="Alias moved to the version when every bound holds (not a number). Default: none.")
    min: Any = Field(None, description="Metric (short or full name) -> lowest allowed value (inclusive). Default: none.")
    max: Any = Field(None, description="Metric (short or full name) -> highest allowed value (inclusive). Default: none.")
    better: Any = Field(None, description="Champion/challenger: metrics (short or full names, each with a better "
                        "direction) on which the version must be significantly better than the version now holding "
                        "alias, judged on the same token plan (paired block bootstrap, Holm). Default: none.")
    guard: Any = Field(None, description="Champion/challenger: metrics on which the version must not be significantly "
                       "worse than the holder of alias. Default: none.")
    alpha: Any = Field(0.05, description="Family-wise error rate of the champion/challenger verdicts (Holm over the "
                       "better and guard metrics), in (0, 0.5]. Default 0.05.")


class PolicySpec(_Spec):
    """The policy file's top level."""

    rules: Any = Field(None, description="Rules checked in order (the first that accepts an event wins). "
                       "Default: one rule, a quick analysis of every new version.")
    defaults: Any = Field(None, description="Analysis kind -> options for every rule (a rule's own options win). Default: none.")
    gate: Any = Field(None, description="The quality gate (GateSpec). Default: none.")


_SPEC_KEYS = {
    PolicySpec: ("the top level", "rules, defaults and gate"),
    RuleSpec: ("rules[{i}]", "models, triggers, quick and full"),
    TriggersSpec: ("rules[{i}].triggers", "created, aliases and tags"),
    GateSpec: ("gate", "analysis, alias, min, max, better, guard and alpha"),
}


def _check_keys(model: type[_Spec], raw: Mapping[str, Any], bad, i: int | None = None) -> None:
    """Validate `raw`'s keys against `model` (extra="forbid"); an unknown key -> one sentence."""
    try:
        model.model_validate(dict(raw))
    except ValidationError as e:
        where, known = _SPEC_KEYS[model]
        unknown = sorted(str(err["loc"][-1]) for err in e.errors() if err["type"] == "extra_forbidden")
        what = f"unknown key(s) {unknown}; use {known}" if unknown else str(e.errors()[0]["msg"])
        raise bad(where.format(i=i), what) from None


def parse_policy(data: Any, source: str = "the policy") -> Policy:
    def bad(where: str, what: str) -> InputError:
        return InputError(f"In {source}, {where}: {what}.")

    if not isinstance(data, Mapping):
        raise bad("the top level", "expected a mapping with rules, defaults and gate")
    _check_keys(PolicySpec, data, bad)

    defaults: dict[str, dict[str, Any]] = {}
    raw_defaults = data.get("defaults") or {}
    if not isinstance(raw_defaults, Mapping):
        raise bad("defaults", "expected a mapping of analysis kind to options")
    for kind, opts in raw_defaults.items():
        if kind not in ANALYSIS_KINDS:
            raise bad("defaults", f"unknown analysis kind {kind!r}; use quick or full")
        defaults[kind] = _options(opts, kind, f"defaults.{kind}", bad)

    gate = None
    if data.get("gate") is not None:
        gate = _gate(data["gate"], bad)

    raw_rules = data.get("rules")
    if raw_rules is None:
        rules = [Rule()]
    else:
        if not isinstance(raw_rules, list) or not raw_rules:
            raise bad("rules", "expected a non-empty list of rules")
        rules = [_rule(r, i, bad) for i, r in enumerate(raw_rules)]
    if gate is not None and gate.alias:
        for i, r in enumerate(rules):
            if r.matches_alias(gate.alias):
                raise bad(f"rules[{i}].triggers.aliases", f"the gate's alias {gate.alias!r} would trigger the analysis that sets it")
    return Policy(rules=rules, gate=gate, defaults=defaults, source=source)


def _rule(raw: Any, i: int, bad) -> Rule:
    where = f"rules[{i}]"
    if not isinstance(raw, Mapping):
        raise bad(where, "expected a mapping")
    _check_keys(RuleSpec, raw, bad, i)
    models = raw.get("models", ["*"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise bad(f"{where}.models", "expected a list of model-name globs")
    on = raw.get("triggers") or {}
    if not isinstance(on, Mapping):
        raise bad(f"{where}.triggers", "expected a mapping with created, aliases and tags")
    _check_keys(TriggersSpec, on, bad, i)
    aliases = on.get("aliases") or []
    if isinstance(aliases, str):
        aliases = [aliases]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise bad(f"{where}.triggers.aliases", "expected a list of alias globs")
    tags = on.get("tags") or {}
    if isinstance(tags, list):
        tags = {str(t): "*" for t in tags}
    if not isinstance(tags, Mapping):
        raise bad(f"{where}.triggers.tags", "expected a mapping of tag key to value glob")
    tags = {str(k): "*" if v is None else str(v) for k, v in tags.items()}
    created = on.get("created", not (aliases or tags))  # default: only when no other trigger is given
    if not isinstance(created, bool):
        raise bad(f"{where}.triggers.created", "expected true or false")
    for k in tags:
        if T.is_own_tag(k):
            raise bad(f"{where}.triggers.tags", f"tag {k!r} is written by sae-mlops itself and cannot be a trigger")
    analyses: dict[str, dict[str, Any]] = {}
    for kind in ANALYSIS_KINDS:
        if kind not in raw or raw[kind] is False:
            continue
        opts = {} if raw[kind] in (None, True) else raw[kind]
        analyses[kind] = _options(opts, kind, f"{where}.{kind}", bad)
    if not analyses:
        raise bad(where, "runs no analysis; add quick: {} and/or full: {}")
    if not (created or aliases or tags):
        raise bad(f"{where}.triggers", "has no trigger; set created: true, aliases or tags")
    return Rule(models=list(models), on_created=created, aliases=list(aliases), tags=tags, analyses=analyses)


def _options(raw: Any, kind: str, where: str, bad) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise bad(where, "expected a mapping of analysis options")
    allowed = analysis_option_names(kind)
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _RESERVED_OPTIONS:
            raise bad(f"{where}.{k}", "is set by the service (the version and the worker's device)")
        if k not in allowed:
            raise bad(f"{where}.{k}", f"unknown option; known: {', '.join(sorted(allowed))}")
        if k in ("full_options", "probe_options") and not isinstance(v, Mapping):
            raise bad(f"{where}.{k}", "expected a mapping")
        if k in ("max_tokens", "batch_size", "context_size") and isinstance(v, float) and v.is_integer():
            v = int(v)  # YAML's 2e5 is a float
        out[str(k)] = v
    _check_declared(out, where, bad)
    return out


def _check_declared(options: dict[str, Any], where: str, bad) -> None:
    """Validate the options against their declarations (`AnalysisConfig`, `FullOptions`): types, bounds
    and cross-field rules are the ones the CLI applies, so a policy cannot hold a value the CLI refuses."""
    from sae_mlops.config import AnalysisConfig, FullOptions
    from sae_mlops.errors import InputError

    analysis = {k: v for k, v in options.items() if k not in ("full_options", "probe_options")}
    try:
        AnalysisConfig(sae="models:/policy-check/1", **analysis)
    except InputError as e:
        raise bad(where, str(e).rstrip(".")) from None
    if "full_options" in options:
        try:
            FullOptions(**dict(options["full_options"]))
        except InputError as e:
            raise bad(f"{where}.full_options", str(e).rstrip(".")) from None
    if "probe_options" in options:
        from sae_mlops.config import ProbeOptions

        try:
            ProbeOptions(**dict(options["probe_options"]))
        except InputError as e:
            raise bad(f"{where}.probe_options", str(e).rstrip(".")) from None


def analysis_option_names(kind: str) -> set[str]:
    from sae_mlops.config import AnalysisConfig

    names = {f.name for f in fields(AnalysisConfig)} - _RESERVED_OPTIONS
    if kind == "full":
        names.add("full_options")
    names.add("probe_options")  # k-sparse probing after the analysis, into its run (ProbeOptions fields)
    return names


def _gate(raw: Any, bad) -> Gate:
    if not isinstance(raw, Mapping):
        raise bad("gate", "expected a mapping with analysis, alias, min, max, better, guard and alpha")
    _check_keys(GateSpec, raw, bad)
    analysis = raw.get("analysis", "quick")
    if analysis not in ANALYSIS_KINDS:
        raise bad("gate.analysis", f"unknown analysis kind {analysis!r}; use quick or full")
    alias = raw.get("alias")
    if alias is not None and (not isinstance(alias, str) or not alias or alias.isdigit()):
        raise bad("gate.alias", "expected an alias name (not a number)")
    bounds: dict[str, dict[str, float]] = {}
    for side in ("min", "max"):
        vals = raw.get(side) or {}
        if not isinstance(vals, Mapping):
            raise bad(f"gate.{side}", "expected a mapping of metric name to number")
        bounds[side] = {}
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise bad(f"gate.{side}.{k}", f"expected a number, not {v!r}")
            bounds[side][str(k)] = float(v)
    judged: dict[str, list[str]] = {}
    for side in ("better", "guard"):
        names = raw.get(side) or []
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise bad(f"gate.{side}", "expected a list of metric names")
        from sae_mlops.core.verdicts import judged_metrics

        try:
            judged_metrics(names)
        except ValueError as e:
            raise bad(f"gate.{side}", f"{e}; use metrics with a better direction such as loss_recovered, "
                      "explained_variance, l0, dead_fraction") from None
        judged[side] = list(names)
    alpha = raw.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < float(alpha) <= 0.5:
        raise bad("gate.alpha", f"expected a number in (0, 0.5], not {alpha!r}")
    if (judged["better"] or judged["guard"]) and not alias:
        raise bad("gate.alias", "better/guard compare a version with the holder of the gate's alias; set alias (e.g. champion)")
    return Gate(analysis=analysis, alias=alias, min=bounds["min"], max=bounds["max"], better=judged["better"],
                guard=judged["guard"], alpha=float(alpha))


def finite(v: Any) -> float | None:
    """``v`` as a finite float, or None (None, booleans, non-numbers, NaN and inf)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
