"""The HTTP side: a FastAPI app around a `Service`, and `run_server` (uvicorn) for ``sae-mlops serve``.

Endpoints:

- ``POST /webhooks/mlflow``: an MLflow registry webhook delivery. 202 with the jobs it enqueued
  (or found already queued/done), 200 ``ignored`` (an event the policy does not act on) or
  ``duplicate`` (a delivery id already seen), 401 for a bad signature or a stale timestamp, 400 for
  missing headers or a malformed payload, 413 for a body over 1 MB. A 5xx makes MLflow retry.
- ``GET /health``: ``status`` (ok / degraded: 503 when a worker thread died), queue counts by state
  and depth (queued + running), each worker's state and current job, the reconciler's last scan.
- ``GET /jobs`` (``?state=queued|running|done|failed&limit=N``) and ``GET /jobs/<id>``.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sae_mlops.service.settings import WEBHOOK_PATH, Settings

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

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > 1_000_000:
            return JSONResponse({"status": "rejected", "reason": "body too large"}, status_code=413)
        body = await request.body()
        code, payload = await run_in_threadpool(service.handle_webhook, request.headers, body)
        return JSONResponse(payload, status_code=code)

    @app.get("/health")
    def health():
        code, payload = service.health()
        return JSONResponse(payload, status_code=code)

    @app.get("/jobs")
    def jobs(state: Optional[str] = None, limit: int = 50):
        if service.queue is None:
            raise HTTPException(503, "service not started")
        if state is not None and state not in ("queued", "running", "done", "failed"):
            raise HTTPException(400, "state must be queued, running, done or failed")
        return {"jobs": [j.to_dict() for j in service.queue.list(state, max(1, min(limit, 1000)))]}

    @app.get("/jobs/{job_id}")
    def job(job_id: int):
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

    if settings.tracking_uri:
        # The job processes and MLflow's default clients use the same server.
        os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri
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
