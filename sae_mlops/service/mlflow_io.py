"""The service's MLflow calls: registry write-back, registry scans and the webhook registration.

Write-back (tag names in `sae_mlops.service.tags`): a job that starts sets
``sae_mlops.analysis.<kind>.status=running`` and its job id on the model version; a finished job
sets ``done``, the analysis run id and the headline metrics; a job that failed for good sets
``failed`` and the error. With a quality gate on that kind, ``sae_mlops.analysis.gate`` and its
reasons are set and, when the gate passes, the gate's alias is moved to the version.

Failure classes (`classify`): ``unavailable`` (the tracking server cannot be reached, times out or
answers 5xx: retried without using an attempt), ``denied`` (401/403/404: permission or not found;
the job fails at once with the reason) and ``bug`` (anything else: uses an attempt).

Exactly once in MLflow (`JobRuns`): a job's analysis run is created before the analysis, tagged with
the job's key; a later attempt of the same job closes the runs of earlier attempts left RUNNING as
FAILED, or reuses the earlier attempt's FINISHED run instead of analysing again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, cast

from sae_mlops.service import tags as T
from sae_mlops.service.policy import Gate, GateResult, Policy, finite

log = logging.getLogger(__name__)

MAX_TAG_VALUE = 5000
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
_DENIED = ("PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")

UNAVAILABLE, DENIED, BUG = "unavailable", "denied", "bug"

# MLflow's HTTP client: MLflow's defaults (120 s timeout, 7 retries with exponential backoff) make
# an outage look like a hang for ~4 minutes; the service and its job processes fail fast instead
# and retry at the job level (`apply_http_defaults`).
HTTP_ENV_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
HTTP_ENV_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
HTTP_ENV_BACKOFF = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"


def apply_http_defaults(timeout_s: float, max_retries: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set MLflow's HTTP timeout (whole seconds), retries and backoff factor (1 s) in `environ`
    (default ``os.environ``) unless they are set already (the operator's values win); returns them."""
    env = os.environ if environ is None else environ
    env.setdefault(HTTP_ENV_TIMEOUT, str(max(1, int(round(timeout_s)))))
    env.setdefault(HTTP_ENV_RETRIES, str(max(0, int(max_retries))))
    env.setdefault(HTTP_ENV_BACKOFF, "1")
    return {k: env[k] for k in (HTTP_ENV_TIMEOUT, HTTP_ENV_RETRIES, HTTP_ENV_BACKOFF)}


def classify(exc: BaseException) -> str:
    """``unavailable``, ``denied`` or ``bug`` for an exception from an MLflow call.

    Looks through the exception's causes and contexts (the tracking layer rewrites MLflow errors
    into InputError): a connection error, a timeout or an HTTP status >= 500 anywhere in the chain
    is ``unavailable``; 401/403/404 (or MLflow's PERMISSION_DENIED, UNAUTHENTICATED,
    RESOURCE_DOES_NOT_EXIST) is ``denied``; a `TrackingError` raised by the tracking preflight
    (no cause: the store did not answer, or answered 5xx) is ``unavailable``; anything else is ``bug``.
    """
    import requests
    from mlflow.exceptions import MlflowException, RestException

    seen: set[int] = set()
    e: BaseException | None = exc
    found = BUG
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, VersionMissing):
            return DENIED
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return UNAVAILABLE
        if isinstance(e, MlflowException):
            code = str(getattr(e, "error_code", "") or "")
            try:
                status = int(e.get_http_status_code())
            except Exception:  # noqa: BLE001 - an unknown code
                status = 500
            if code in _DENIED or status in (401, 403, 404):
                return DENIED
            # 5xx from the server (a JSON error, or MLflow's "API request to ... failed" for a
            # connection error, a timeout or a non-JSON 5xx); a local MlflowException is a bug.
            from_http = isinstance(e, RestException) or str(getattr(e, "message", e)).startswith("API request to")
            if from_http and (status >= 500 or code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")):
                return UNAVAILABLE
        e = e.__cause__ or e.__context__
    from sae_mlops.errors import TrackingError

    if isinstance(exc, TrackingError) and exc.__cause__ is None:
        return UNAVAILABLE  # the preflight's "not reachable / no answer / HTTP 5xx on /health"
    return found


def describe(exc: BaseException, limit: int = 500) -> str:
    """One line for an MLflow error (the first line of its message, cut to `limit` characters)."""
    text = str(getattr(exc, "message", None) or exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0] if text.splitlines() else text}"[:limit]


class TrackingProbe:
    """Whether the tracking server answers: ``GET <uri>/health`` with a short timeout, cached for
    `ttl_s` seconds (a non-HTTP store, e.g. sqlite, is local and always reachable)."""

    def __init__(self, tracking_uri: str | None, timeout_s: float = 2.0, ttl_s: float = 5.0) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def check(self) -> dict[str, Any]:
        """``{"reachable": bool, "uri": ..., "checked_at": unix s, "latency_ms": ..., "error": ...}``."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl_s:
                return self._cached[1]
            result = self._probe()
            self._cached = (time.monotonic(), result)
            return result

    def _probe(self) -> dict[str, Any]:
        uri = self.tracking_uri
        out: dict[str, Any] = {"uri": _redact(uri), "checked_at": time.time()}
        if not uri.startswith(("http://", "https://")):
            return {**out, "reachable": True, "detail": "local store"}
        import requests

        started = time.monotonic()
        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=self.timeout_s)
            ok = r.status_code < 500
            error = None if ok else f"HTTP {r.status_code}"
        except requests.RequestException as e:
            ok, error = False, f"{type(e).__name__}: {e}"[:300]
        out.update(reachable=ok, latency_ms=round(1000 * (time.monotonic() - started), 1))
        if error:
            out["error"] = error
        return out


def _redact(uri: str) -> str:
    """The URI without credentials (``http://user:pw@host`` -> ``http://***@host``)."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


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
            if gate.challenges:
                result = self._challenge(name, version, kind, run_id, gate, result)
            self._set_tags(name, version, {
                T.GATE_TAG: "passed" if result.passed else "failed",
                T.GATE_REASONS_TAG: result.summary()[-MAX_TAG_VALUE:],
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

    def _challenge(self, name: str, version: str, kind: str, run_id: str | None, gate: Gate,
                   bounds: GateResult) -> GateResult:
        """Champion/challenger (`sae_mlops.service.gate`): judge this version's analysis against the
        analysis of the version holding ``gate.alias``; write the decision (tags ``sae_mlops.gate``,
        ``sae_mlops.gate_reason``, ``sae_mlops.gate_reference``) and the verdict table (the version's
        description); return the gate's result, passed only when promoted."""
        from sae_mlops.service.gate import HELD, PROMOTED, Challenge, gate_section

        assert gate.alias
        holder = self._alias_holder(name, gate.alias)
        if not bounds.passed:
            outcome = Challenge(HELD, f"the bounds do not hold: {bounds.summary()}")
        elif holder is None:
            outcome = Challenge(PROMOTED, f"no version holds {gate.alias} yet and the bounds hold")
        elif holder.version == str(version):
            outcome = Challenge(PROMOTED, f"this version already holds {gate.alias} (re-analysed)")
        else:
            outcome = self._judge(holder, kind, run_id, gate)
        reasons = list(bounds.reasons) + ([] if outcome.promoted or not bounds.passed else [outcome.reason])
        self._set_tags(name, version, {
            T.GATE_DECISION_TAG: outcome.decision,
            T.GATE_REASON_TAG: outcome.reason[-MAX_TAG_VALUE:],
            T.GATE_REFERENCE_TAG: f"{name} {outcome.reference}" if outcome.reference else "none",
        })
        self.client.update_model_version(name, version, description=gate_section(
            self.client.get_model_version(name, version).description, outcome.markdown(gate.alias, version)))
        log.info("gate %s for %s v%s: %s", outcome.decision, name, version, outcome.reason,
                 extra={"model": name, "version": version, "alias": gate.alias})
        return GateResult(passed=outcome.promoted, reasons=reasons, values=bounds.values)

    def _judge(self, holder: VersionInfo, kind: str, run_id: str | None, gate: Gate) -> Any:
        from sae_mlops.service.gate import HELD, Challenge, challenge
        from sae_mlops.tracking.artifacts import load_block_sums

        ref = f"v{holder.version}"
        champion_run = holder.tags.get(T.analysis_tag(kind, "run_id"))
        if not champion_run:
            return Challenge(HELD, f"{ref} (holding {gate.alias}) has no {kind} analysis to compare with; analyse it "
                             "(e.g. set its tag analyze) and re-analyse this version", ref)
        try:
            mine = load_block_sums(run_id, client=self.client) if run_id else None
            theirs = load_block_sums(champion_run, client=self.client)
        except ValueError as e:
            return Challenge(HELD, f"the per-block sums cannot be read ({e})", ref)
        if mine is None or theirs is None:
            which = "this version's" if mine is None else f"{ref}'s"
            return Challenge(HELD, f"{which} {kind} analysis has no per-block sums (analysed before intervals existed); "
                             "re-analyse it", ref)
        return challenge(mine, theirs, holder.version, gate.better, gate.guard, gate.alpha)

    def _alias_holder(self, name: str, alias: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            # no holder: "Registered model alias <alias> not found." (INVALID_PARAMETER_VALUE in MLflow 3)
            if getattr(e, "error_code", "") in _MISSING or f"alias {alias} not found" in str(e):
                return None
            raise
        return VersionInfo(mv.name, str(mv.version), str(mv.status), dict(mv.tags or {}), list(mv.aliases or []))

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

    # --- the job's runs (exactly once) ------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created (or restored) if needed."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)  # created concurrently
            if found is None:
                raise
            return found.experiment_id

    def job_runs(self, experiment: str, job_key: str) -> list[Any]:
        """The runs of `experiment` tagged with `job_key` (every attempt of one job), oldest first."""
        from sae_mlops.service.tags import RUN_TAG_JOB_KEY

        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = self.client.search_runs(
            [found.experiment_id], filter_string=f"tags.`{RUN_TAG_JOB_KEY}` = '{job_key}'", max_results=100,
            order_by=["attributes.start_time ASC"],
        )
        return list(runs)

    def close_job_runs(self, experiment: str, job_key: str, keep: str | None = None) -> list[str]:
        """End every RUNNING run of the job (except `keep`) as FAILED; returns their ids."""
        closed = []
        for run in self.job_runs(experiment, job_key):
            if run.info.status == "RUNNING" and run.info.run_id != keep:
                self.client.set_terminated(run.info.run_id, "FAILED")
                closed.append(run.info.run_id)
        if closed:
            log.warning("closed %d run(s) of an earlier attempt of job %s as FAILED: %s", len(closed), job_key,
                        ", ".join(closed))
        return closed

    def create_job_run(self, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
        """A new RUNNING run in `experiment` with `tags` (plus MLflow's user/source tags)."""
        from mlflow.tracking.context import registry as context_registry

        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name,
                                     tags=context_registry.resolve_tags(dict(tags)))
        return run.info.run_id

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

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
                versions = self.client.search_model_versions(f"name='{name}'", max_results=200, page_token=token)
                for mv in versions:
                    yield VersionInfo(
                        name=mv.name,
                        version=str(mv.version),
                        status=str(getattr(mv, "status", "READY") or "READY"),
                        tags=dict(getattr(mv, "tags", {}) or {}),
                        aliases=list(getattr(mv, "aliases", []) or []),
                    )
                token = getattr(versions, "token", None)
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
            wh = self.client.create_webhook(name=name, url=url, events=cast(Any, events), secret=secret,
                                            description="sae-mlops serve: registry-triggered SAE analysis")
            log.info("created MLflow webhook %s (%s) -> %s for %s", wh.name, wh.webhook_id, url, ",".join(events))
            return wh.webhook_id
        self.client.update_webhook(existing.webhook_id, url=url, events=cast(Any, events), secret=secret, status="ACTIVE")
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
