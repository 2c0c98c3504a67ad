"""A small OpenAI-compatible chat server for the label tests (FastAPI + uvicorn on 127.0.0.1, in a
thread). Deterministic: a label request for feature N answers the label "feature N"; a detection
request answers that every snippet is active. Scripted faults per feature, each once: malformed
JSON, HTTP 429 (with Retry-After), a response slower than the client's timeout; and a feature whose
answers are always malformed. Every request is recorded (kind, feature, status)."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Script:
    malformed_once: set[int] = field(default_factory=set)
    always_malformed: set[int] = field(default_factory=set)
    rate_limited_once: set[int] = field(default_factory=set)
    slow_once: set[int] = field(default_factory=set)
    slow_seconds: float = 2.0
    delay: float = 0.0  # every answer waits this long
    # Label requests after the first `hold_after` wait until `release` is set (`held` is set when the
    # first one arrives): a run is interrupted at a known point, not after some seconds.
    hold_after: int | None = None
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    prior_fields: set[int] = field(default_factory=set)  # answer as the prior labeler did (other field names)
    detection_fails: set[int] = field(default_factory=set)  # detection requests answered HTTP 400


def make_app(script: Script, log: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()
    seen: dict[tuple[str, int], int] = {}
    labels_asked = [0]
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        user = body["messages"][1]["content"]
        label = re.match(r"Feature (\d+)\.", user)
        kind = "label" if label else "detection"
        feature = int(label.group(1)) if label else int(re.search(r"explanation: feature (\d+)", user).group(1))
        with lock:
            n = seen.get((kind, feature), 0)
            seen[(kind, feature)] = n + 1
            labels_asked[0] += kind == "label"
            hold = script.hold_after is not None and kind == "label" and labels_asked[0] > script.hold_after
        entry = {"kind": kind, "feature": feature, "n": n, "turns": len(body["messages"]), "auth": request.headers.get("authorization", "")}
        if hold:
            script.held.set()
            while not script.release.is_set():
                await asyncio.sleep(0.02)
        if script.delay:
            await asyncio.sleep(script.delay)
        if kind == "label" and feature in script.rate_limited_once and n == 0:
            log.append({**entry, "status": 429})
            return JSONResponse({"error": {"message": "rate limited", "type": "rate_limit"}}, status_code=429, headers={"retry-after-ms": "50"})
        if kind == "label" and feature in script.slow_once and n == 0:
            log.append({**entry, "status": "slow"})
            await asyncio.sleep(script.slow_seconds)
        if kind == "detection" and feature in script.detection_fails:
            log.append({**entry, "status": 400})
            return JSONResponse({"error": {"message": "context too long", "type": "invalid_request_error"}}, status_code=400)
        if kind == "label" and feature in script.prior_fields:
            content = ('{"label": "feature %d", "description": "d", "category": "c", "monosemantic": true, '
                       '"interpretability_score": 4, "knowledge_domain": "general", "abstraction_level": "lexical", '
                       '"confidence": 0.9, "examples_used": 15}' % feature)
        elif kind == "label":
            bad = feature in script.always_malformed or (feature in script.malformed_once and n == 0)
            content = "Sure! The label is: {label: feature" if bad else (
                '```json\n{"label": "feature %d", "description": "fires on things of kind %d", "category": "lexical", '
                '"monosemantic": %s, "interpretability": %d, "knowledge_domain": "general", "abstraction_level": "Token"}\n```'
                % (feature, feature, "true" if feature % 2 == 0 else "false", 1 + feature % 5)
            )
        else:
            count = len(re.findall(r"^\d+\. ", user, re.M))
            content = '{"active": [%s]}' % ", ".join(str(i) for i in range(1, count + 1))
        log.append({**entry, "status": 200})
        return {
            "id": f"chatcmpl-{kind}-{feature}-{n}", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "stub"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }

    return app


class StubServer:
    """Run the stub on a free 127.0.0.1 port in a thread; ``url`` is the base URL (``.../v1``)."""

    def __init__(self, script: Script | None = None):
        self.script = script or Script()
        self.log: list[dict[str, Any]] = []
        # The socket is bound here and handed to uvicorn: the port cannot be taken in between.
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(make_app(self.script, self.log), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        deadline = time.monotonic() + 60  # a loaded machine
        while time.monotonic() < deadline and self.thread.is_alive():
            if self.server.started:
                return self
            time.sleep(0.02)  # polls uvicorn's flag (it offers no event)
        self.sock.close()
        raise RuntimeError("stub server did not start")

    def __exit__(self, *exc: Any) -> None:
        self.script.release.set()  # held requests end
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


if __name__ == "__main__":  # `python tests/openai_stub.py PORT [DELAY]`: serve in the foreground
    import sys

    s = StubServer(Script(delay=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0))
    uvicorn.run(make_app(s.script, s.log), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
