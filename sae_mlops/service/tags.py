"""Names of the model-version tags and run tags the service writes (no MLflow import here).

On a model version, per analysis kind (``quick`` / ``full``):

- ``sae_mlops.analysis.<kind>.status``: ``running``, ``done`` or ``failed``;
- ``sae_mlops.analysis.<kind>.run_id``: the MLflow run holding the analysis;
- ``sae_mlops.analysis.<kind>.job_id``: the service's job id (``GET /jobs/<id>``);
- ``sae_mlops.analysis.<kind>.updated_at``: UTC ISO time of the last status change;
- ``sae_mlops.analysis.<kind>.error``: why the last attempt failed (failed only);
- ``sae_mlops.analysis.<kind>.<metric>``: headline metrics (`HEADLINE_METRICS`, plus any metric
  the quality gate uses), formatted with 6 significant digits;
- ``sae_mlops.analysis.gate``: ``passed`` or ``failed`` and ``sae_mlops.analysis.gate_reasons``
  when a quality gate is configured;
- champion/challenger gate (``better``/``guard``): ``sae_mlops.gate`` (``promoted`` or ``held``),
  ``sae_mlops.gate_reason`` (one sentence) and ``sae_mlops.gate_reference`` (the alias holder judged
  against), and the verdict table in the version's description.

Every key starts with ``sae_mlops.``: the policy ignores ``model_version_tag.set`` events for such
keys, so the service's own writes never trigger analyses.
"""

from __future__ import annotations

from sae_mlops.metrics import ALIASES, BY_SHORT, full_name

OWN_PREFIX = "sae_mlops."
ANALYSIS_PREFIX = "sae_mlops.analysis."

STATUS_RUNNING = "running"
STATUS_DONE = "done"
STATUS_FAILED = "failed"

# Short names (used in tags and in the quality gate) -> metric names, from the metric registry.
HEADLINE_METRICS: dict[str, str] = {
    short: BY_SHORT[short].name for short in ("loss_recovered", "l0", "explained_variance", "dead_fraction")
}
METRIC_ALIASES: dict[str, str] = {**{short: m.name for short, m in BY_SHORT.items()}, **ALIASES}

GATE_TAG = "sae_mlops.analysis.gate"
GATE_REASONS_TAG = "sae_mlops.analysis.gate_reasons"
# Champion/challenger (a gate with better/guard): did the alias move, why, and against which holder.
GATE_DECISION_TAG = "sae_mlops.gate"  # promoted | held
GATE_REASON_TAG = "sae_mlops.gate_reason"
GATE_REFERENCE_TAG = "sae_mlops.gate_reference"  # "<model> v<N>" (the holder judged against) or "none"

RUN_TAG_JOB_ID = "sae_mlops.service.job_id"
RUN_TAG_TRIGGER = "sae_mlops.service.trigger"
RUN_TAG_JOB_KEY = "sae_mlops.service.job_key"  # <queue instance id>:<job id>, unique across services
RUN_TAG_ATTEMPT = "sae_mlops.service.attempt"


def analysis_tag(kind: str, field: str) -> str:
    """``sae_mlops.analysis.<kind>.<field>``."""
    return f"{ANALYSIS_PREFIX}{kind}.{field}"


def status_tag(kind: str) -> str:
    return analysis_tag(kind, "status")


def metric_name(short_or_full: str) -> str:
    """The results' metric name for a short name (``loss_recovered``) or a full one (``recon/cosine``)."""
    return full_name(short_or_full)


def metric_tag_suffix(name: str) -> str:
    """The tag suffix for a metric: its short name when it has one, else the name with / -> _."""
    for short, full in HEADLINE_METRICS.items():
        if name in (short, full):
            return short
    return name.replace("/", "_")


def is_own_tag(key: str) -> bool:
    return key.startswith(OWN_PREFIX)
