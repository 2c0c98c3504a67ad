"""The HTTP side: a FastAPI app around a `Service`, and `run_server` (uvicorn) for ``sae-mlops serve``.

Endpoints:

- ``POST /webhooks/mlflow``: an MLflow registry webhook delivery. 202 with the jobs it enqueued
  (or found already queued/done), 200 ``ignored`` (an event the policy does not act on) or
  ``duplicate`` (a delivery id already seen), 401 for a bad signature or a stale timestamp, 400 for
  missing headers or a malformed payload, 413 for a body over 1 MB. The body is read as a stream and
  cut off at the limit before anything parses it (chunked bodies included; a declared
  ``Content-Length`` over the limit is refused before reading). A 5xx makes MLflow retry.
- ``GET /health``: ``status``: ``ok``; ``degraded`` with HTTP 200 when the tracking server is
  unreachable or answers 5xx (``tracking.reachable`` false: the service still accepts and queues
  deliveries, jobs wait for MLflow), ``degraded`` with HTTP 503 when a worker thread died. With
  details: queue counts and depth, each worker's state and current job, the reconciler's last scan,
  the tracking probe (GET <tracking uri>/health, short timeout, cached 5 s).
- ``GET /jobs`` (``?state=queued|running|done|failed&limit=N``) and ``GET /jobs/<id>``.

Read access: with ``read_token`` set, ``GET /jobs``, ``/jobs/<id>`` and /health's details need
``Authorization: Bearer <token>``; without it they answer loopback clients only. Others get 403
(/health: only ``status``, ``tracking.reachable`` and the status code, for load balancers).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sae_mlops.service.service import MAX_BODY_BYTES
from sae_mlops.service.settings import WEBHOOK_PATH, Settings

_TOO_LARGE = {"status": "rejected", "reason": "body too large"}


async def read_body_limited(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The body, or None as soon as more than `limit` bytes have arrived (nothing more is read)."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def may_read(request: Request, token: str | None) -> bool:
    """Whether the client may see the read endpoints: the bearer token when one is configured,
    else a loopback client."""
    if token:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
    return _is_loopback(request.client.host if request.client else None)

log = logging.getLogger(__name__)


def create_app(service: Any) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="sae-mlops serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)

    token = getattr(service.settings, "read_token", None)

    def guard(request: Request) -> None:
        if not may_read(request, token):
            raise HTTPException(403, "read endpoints need the read token (Authorization: Bearer ...)" if token
                                else "read endpoints answer loopback clients only; set read_token to allow others")

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request):
        body = await read_body_limited(request)
        if body is None:
            return JSONResponse(_TOO_LARGE, status_code=413, headers={"Connection": "close"})
        code, payload = await run_in_threadpool(service.handle_webhook, request.headers, body)
        return JSONResponse(payload, status_code=code)

    @app.get("/health")
    def health(request: Request):
        code, payload = service.health()
        if not may_read(request, token):
            payload = {"status": payload.get("status"),
                       "tracking": {"reachable": (payload.get("tracking") or {}).get("reachable")}}
        return JSONResponse(payload, status_code=code)

    @app.get("/jobs")
    def jobs(request: Request, state: Optional[str] = None, limit: int = 50):
        guard(request)
        if service.queue is None:
            raise HTTPException(503, "service not started")
        if state is not None and state not in ("queued", "running", "done", "failed"):
            raise HTTPException(400, "state must be queued, running, done or failed")
        return {"jobs": [j.to_dict() for j in service.queue.list(state, max(1, min(limit, 1000)))]}

    @app.get("/jobs/{job_id}")
    def job(request: Request, job_id: int):
        guard(request)
        if service.queue is None:
            raise HTTPException(503, "service not started")
        j = service.queue.get(job_id)
        if j is None:
            raise HTTPException(404, f"no job {job_id}")
        return j.to_dict()

    return app


def run_server(settings: Settings) -> None:
    """Load the policy, open the service (lock, queue, requeue) and serve until stopped (SIGINT/SIGTERM)."""
    import uvicorn

    from sae_mlops.service.policy import load_policy
    from sae_mlops.service.service import Service

    from sae_mlops.service.mlflow_io import apply_http_defaults

    if settings.tracking_uri:
        # The job processes and MLflow's default clients use the same server.
        os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    # Fail fast on an outage (the job is retried at the queue level), in this process and its jobs.
    http = apply_http_defaults(settings.mlflow_http_timeout_s, settings.mlflow_http_max_retries)
    log.debug("MLflow HTTP client: %s", http)
    if not _is_loopback(settings.host) and not settings.read_token:
        log.warning("listening on %s without read_token: GET /jobs and /health details answer loopback clients only",
                    settings.host)
    policy = load_policy(settings.policy_file, settings.policy)
    service = Service(settings, policy)
    service.open()
    log.info("listening on http://%s:%d%s (health: /health)", settings.host, settings.port, WEBHOOK_PATH)
    uvicorn.run(
        create_app(service),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )


def _version() -> str:
    from sae_mlops import __version__

    return __version__
