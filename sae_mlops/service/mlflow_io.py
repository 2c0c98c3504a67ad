"""The service's MLflow calls: registry write-back, registry scans and the webhook registration.

Write-back (tag names in `sae_mlops.service.tags`): a job that starts sets
``sae_mlops.analysis.<kind>.status=running`` and its job id on the model version; a finished job
sets ``done``, the analysis run id and the headline metrics; a job that failed for good sets
``failed`` and the error. With a quality gate on that kind, ``sae_mlops.analysis.gate`` and its
reasons are set and, when the gate passes, the gate's alias is moved to the version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

from sae_mlops.service import tags as T
from sae_mlops.service.policy import Gate, GateResult, Policy, finite

log = logging.getLogger(__name__)

MAX_TAG_VALUE = 5000
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)


class VersionMissing(Exception):
    """The model version no longer exists (deleted, or never did: e.g. MLflow's test delivery)."""


class RegistryIO:
    """MLflow registry access for the service (`tracking_uri` None: MLflow's default)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- write-back ---------------------------------------------------------------------

    def mark_running(self, name: str, version: str, kind: str, job_id: int) -> None:
        self._set_tags(name, version, {
            T.status_tag(kind): T.STATUS_RUNNING,
            T.analysis_tag(kind, "job_id"): str(job_id),
            T.analysis_tag(kind, "updated_at"): _now_iso(),
        })

    def write_done(
        self, name: str, version: str, kind: str, job_id: int, run_id: str | None, metrics: Mapping[str, Any],
        gate: Gate | None = None,
    ) -> GateResult | None:
        """Status, run id and headline metrics; then the gate (tags, and the alias when it passes)."""
        current = self.get_version(name, version)
        values: dict[str, str] = {
            T.analysis_tag(kind, "job_id"): str(job_id),
            T.analysis_tag(kind, "updated_at"): _now_iso(),
        }
        if run_id:
            values[T.analysis_tag(kind, "run_id")] = run_id
        names = dict(T.HEADLINE_METRICS)
        if gate is not None and gate.analysis == kind:
            names.update({n: T.metric_name(n) for n in gate.metric_names()})
        for short, full in names.items():
            v = finite(metrics.get(full))
            if v is not None:
                values[T.analysis_tag(kind, T.metric_tag_suffix(short))] = f"{v:.6g}"
        self._set_tags(name, version, values)
        if T.analysis_tag(kind, "error") in current.tags:
            self._delete_tag(name, version, T.analysis_tag(kind, "error"))
        result = None
        if gate is not None and gate.analysis == kind:
            result = gate.evaluate(metrics)
            self._set_tags(name, version, {
                T.GATE_TAG: "passed" if result.passed else "failed",
                T.GATE_REASONS_TAG: result.summary(),
            })
            if result.passed and gate.alias:
                self.client.set_registered_model_alias(name, gate.alias, version)
                log.info("gate passed: alias %s -> %s v%s", gate.alias, name, version,
                         extra={"model": name, "version": version, "alias": gate.alias})
            else:
                log.info("gate %s for %s v%s: %s", "passed" if result.passed else "failed", name, version,
                         result.summary(), extra={"model": name, "version": version})
        # The status goes last: whoever sees "done" sees the run id, metrics and gate too.
        self._set_tags(name, version, {T.status_tag(kind): T.STATUS_DONE})
        return result

    def write_failed(self, name: str, version: str, kind: str, job_id: int, error: str) -> None:
        self._set_tags(name, version, {
            T.analysis_tag(kind, "job_id"): str(job_id),
            T.analysis_tag(kind, "error"): error[-MAX_TAG_VALUE:] or "failed",
            T.analysis_tag(kind, "updated_at"): _now_iso(),
            T.status_tag(kind): T.STATUS_FAILED,
        })

    def tag_run(self, run_id: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    # --- scans --------------------------------------------------------------------------

    def iter_versions(self, policy: Policy) -> Iterator[VersionInfo]:
        """Every version of every registered model whose name a policy rule matches."""
        token = None
        names: list[str] = []
        for _ in range(100_000):  # pages; bounded
            page = self.client.search_registered_models(max_results=100, page_token=token)
            names.extend(m.name for m in page if policy.matches_model(m.name))
            token = getattr(page, "token", None)
            if not token:
                break
        for name in names:
            if "'" in name:
                log.warning("skipping registered model %r in the scan: quotes in names cannot be searched", name)
                continue
            token = None
            for _ in range(100_000):
                page = self.client.search_model_versions(f"name='{name}'", max_results=200, page_token=token)
                for mv in page:
                    yield VersionInfo(
                        name=mv.name,
                        version=str(mv.version),
                        status=str(getattr(mv, "status", "READY") or "READY"),
                        tags=dict(getattr(mv, "tags", {}) or {}),
                        aliases=list(getattr(mv, "aliases", []) or []),
                    )
                token = getattr(page, "token", None)
                if not token:
                    break

    def get_version(self, name: str, version: str) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(name, version)
        except MlflowException as e:
            if getattr(e, "error_code", "") in _MISSING:
                raise VersionMissing(f"{name} v{version} does not exist in the registry") from None
            raise
        return VersionInfo(mv.name, str(mv.version), str(mv.status), dict(mv.tags or {}), list(mv.aliases or []))

    # --- webhook ------------------------------------------------------------------------

    def ensure_webhook(self, name: str, url: str, secret: str, events: list[str]) -> str:
        """Create the webhook `name` (or update the one with that name) to POST `events` to `url`."""
        existing = None
        token = None
        for _ in range(10_000):
            page = self.client.list_webhooks(max_results=100, page_token=token)
            for wh in page:
                if wh.name == name:
                    existing = wh
            token = getattr(page, "token", None)
            if not token or existing is not None:
                break
        if existing is None:
            wh = self.client.create_webhook(name=name, url=url, events=events, secret=secret,
                                            description="sae-mlops serve: registry-triggered SAE analysis")
            log.info("created MLflow webhook %s (%s) -> %s for %s", wh.name, wh.webhook_id, url, ",".join(events))
            return wh.webhook_id
        self.client.update_webhook(existing.webhook_id, url=url, events=events, secret=secret, status="ACTIVE")
        log.info("updated MLflow webhook %s (%s) -> %s for %s", name, existing.webhook_id, url, ",".join(events))
        return existing.webhook_id

    # --- helpers ------------------------------------------------------------------------

    def _set_tags(self, name: str, version: str, values: Mapping[str, str]) -> None:
        from mlflow.exceptions import MlflowException

        for k, v in values.items():
            try:
                self.client.set_model_version_tag(name, version, k, v)
            except MlflowException as e:
                if getattr(e, "error_code", "") in _MISSING:
                    raise VersionMissing(f"{name} v{version} does not exist in the registry") from None
                raise

    def _delete_tag(self, name: str, version: str, key: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_model_version_tag(name, version, key)
        except MlflowException:
            pass  # not there


def is_missing(exc: BaseException) -> bool:
    return isinstance(exc, VersionMissing)


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
