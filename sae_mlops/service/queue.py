"""The durable job queue and delivery log: one SQLite file (WAL, synchronous=FULL).

Jobs go ``queued -> running -> done``, or back to ``queued`` (with a backoff) after a failed attempt
while attempts remain, else ``failed``. Due jobs are claimed in the order they were first enqueued
(``created_at``, then id): a job put back after a failed attempt, an outage or a restart keeps its
place. While ``running``, ``phase`` says what the worker is doing (``starting``: contacting MLflow,
no process yet; ``analysing``: the job process, ``pid``, runs; ``writing back``). A tracking-server
outage gives the attempt back (`mark_unavailable`) and is timed from its first sighting
(``outage_since``) so that a job fails once an outage has lasted longer than the limit. A job left ``running`` by a service that died is put back
to ``queued`` when the queue is opened by the next service (`requeue_running`). At most one job per
(model, version, kind) is queued or running at a time: enqueueing the same analysis again returns
the active job. A done (or finally failed) analysis is not enqueued again unless the request is
forced (a tag trigger).

Deliveries: every verified webhook delivery id is recorded, in the same transaction as the jobs it
enqueues, so a repeated delivery (MLflow's retry, or a replay) is recognised, also after a restart.
Ids older than the replay horizon are pruned (deliveries that old are refused by their timestamp).

One connection, shared by the service's threads behind a lock; the job processes never open it.
"""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sae_mlops.service.policy import JobRequest

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)
ACTIVE = (QUEUED, RUNNING)
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    options TEXT NOT NULL,
    trigger TEXT NOT NULL,
    delivery_id TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    not_before REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker TEXT,
    pid INTEGER,
    run_id TEXT,
    error TEXT,
    result TEXT,
    phase TEXT,
    outage_since REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (model_name, version, kind, state);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    event TEXT,
    outcome TEXT NOT NULL,
    job_ids TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries (received_at);
"""


@dataclass(frozen=True)
class Job:
    id: int
    model_name: str
    version: str
    kind: str
    options: dict[str, Any]
    trigger: str
    delivery_id: str | None
    state: str
    attempts: int
    max_attempts: int
    not_before: float
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    pid: int | None
    run_id: str | None
    error: str | None
    result: dict[str, Any] | None
    phase: str | None = None
    outage_since: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model_name, self.version, self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class EnqueueResult:
    job_id: int
    created: bool
    reason: str  # "enqueued", "active" (already queued/running), "done", "failed"


@dataclass(frozen=True)
class DeliveryResult:
    duplicate: bool
    results: list[EnqueueResult]

    @property
    def job_ids(self) -> list[int]:
        return [r.job_id for r in self.results]

    @property
    def created(self) -> list[int]:
        return [r.job_id for r in self.results if r.created]


class JobQueue:
    """The queue in `path` (created if missing)."""

    def __init__(self, path: str | Path, max_attempts: int = 3, backoff_s: float = 30.0, backoff_max_s: float = 1800.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("SQLite refused WAL mode for %s (journal_mode=%s)", self.path, mode)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} was written by a newer sae-mlops (schema {row[0]} > {SCHEMA_VERSION})")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
            for name, decl in (("phase", "TEXT"), ("outage_since", "REAL")):  # schema 1 -> 2
                if name not in columns:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
            self._db.execute("DROP INDEX IF EXISTS jobs_by_state")
            self._db.execute("CREATE INDEX jobs_by_state ON jobs (state, created_at, id)")
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(SCHEMA_VERSION),),
            )
            row = self._db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()
            if row is None:
                self.instance_id = uuid.uuid4().hex[:12]
                self._db.execute("INSERT INTO meta (key, value) VALUES ('instance_id', ?)", (self.instance_id,))
            else:
                self.instance_id = str(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- deliveries ----------------------------------------------------------------------

    def accept_delivery(
        self, delivery_id: str, event: str, requests: list[JobRequest], outcome: str, now: float | None = None
    ) -> DeliveryResult:
        """Record a verified delivery and enqueue its jobs atomically; a known id changes nothing."""
        now = time.time() if now is None else now
        with self._tx() as db:
            if db.execute("SELECT 1 FROM deliveries WHERE delivery_id=?", (delivery_id,)).fetchone():
                return DeliveryResult(duplicate=True, results=[])
            results = [self._enqueue(db, r, now, delivery_id) for r in requests]
            db.execute(
                "INSERT INTO deliveries (delivery_id, received_at, event, outcome, job_ids) VALUES (?, ?, ?, ?, ?)",
                (delivery_id, now, event, outcome, json.dumps([r.job_id for r in results])),
            )
        return DeliveryResult(duplicate=False, results=results)

    def seen_delivery(self, delivery_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM deliveries WHERE delivery_id=?", (delivery_id,)).fetchone() is not None

    def prune_deliveries(self, older_than: float) -> int:
        """Forget delivery ids received before `older_than` (Unix seconds)."""
        with self._tx() as db:
            return db.execute("DELETE FROM deliveries WHERE received_at < ?", (older_than,)).rowcount

    # --- jobs ----------------------------------------------------------------------------

    def enqueue(self, request: JobRequest, now: float | None = None) -> EnqueueResult:
        now = time.time() if now is None else now
        with self._tx() as db:
            return self._enqueue(db, request, now, None)

    def _enqueue(self, db: sqlite3.Connection, r: JobRequest, now: float, delivery_id: str | None) -> EnqueueResult:
        rows = db.execute(
            "SELECT id, state FROM jobs WHERE model_name=? AND version=? AND kind=? ORDER BY id DESC",
            (r.model_name, r.version, r.kind),
        ).fetchall()
        for row in rows:
            if row["state"] in ACTIVE:
                return EnqueueResult(row["id"], False, "active")
        if rows and not r.force:
            latest = rows[0]
            return EnqueueResult(latest["id"], False, latest["state"])
        cur = db.execute(
            "INSERT INTO jobs (model_name, version, kind, options, trigger, delivery_id, state, attempts, max_attempts,"
            " not_before, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?)",
            (r.model_name, r.version, r.kind, json.dumps(r.options, sort_keys=True), r.trigger, delivery_id,
             self.max_attempts, now, now, now),
        )
        assert cur.lastrowid is not None
        job_id = int(cur.lastrowid)
        log.info(
            "enqueued job %d: %s analysis of %s v%s (%s)", job_id, r.kind, r.model_name, r.version, r.trigger,
            extra={"job_id": job_id, "model": r.model_name, "version": r.version, "kind": r.kind, "trigger": r.trigger},
        )
        return EnqueueResult(job_id, True, "enqueued")

    def has_job(self, model_name: str, version: str, kind: str) -> bool:
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM jobs WHERE model_name=? AND version=? AND kind=? LIMIT 1", (model_name, version, kind)
            ).fetchone() is not None

    def job_key(self, job_id: int) -> str:
        """``<instance id>:<job id>``: names the job's MLflow runs uniquely, also across services
        sharing an experiment (each queue file has its own random instance id)."""
        return f"{self.instance_id}:{job_id}"

    def claim(self, worker: str, now: float | None = None) -> Job | None:
        """Take the due queued job enqueued first for `worker` (running, phase starting,
        attempts + 1), or None. A job's place is its first enqueue time, not when it became due."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state='queued' AND not_before <= ? ORDER BY created_at, id LIMIT 1", (now,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', phase='starting', attempts=attempts+1, started_at=?, updated_at=?,"
                " worker=?, pid=NULL, error=NULL WHERE id=?",
                (now, now, worker, row["id"]),
            )
            return self._get(db, row["id"])

    def set_pid(self, job_id: int, pid: int | None) -> None:
        with self._tx() as db:
            phase = "analysing" if pid else None
            db.execute("UPDATE jobs SET pid=?, phase=COALESCE(?, phase), updated_at=? WHERE id=?", (pid, phase, time.time(), job_id))

    def set_phase(self, job_id: int, phase: str, pid: int | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET phase=?, pid=?, updated_at=? WHERE id=?", (phase, pid, time.time(), job_id))

    def tracking_ok(self, job_id: int) -> None:
        """MLflow answered for this job: an outage being timed is over."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET outage_since=NULL WHERE id=? AND outage_since IS NOT NULL", (job_id,))

    def mark_unavailable(self, job_id: int, error: str, delay: float, max_outage_s: float, now: float | None = None) -> Job:
        """The tracking server was unreachable (or answered 5xx) for this attempt: back to queued
        after `delay` seconds with the attempt given back, unless the outage, timed from its first
        sighting for this job, has lasted more than `max_outage_s` seconds: then failed."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._get(db, job_id)
            since = job.outage_since if job.outage_since is not None else now
            attempts = max(0, job.attempts - 1)
            if now - since > max_outage_s:
                msg = f"the tracking server was unreachable for {now - since:.0f}s (limit {max_outage_s:g}s): {error}"
                db.execute(
                    "UPDATE jobs SET state='failed', phase=NULL, attempts=?, finished_at=?, updated_at=?, pid=NULL, error=?,"
                    " outage_since=? WHERE id=?",
                    (attempts, now, now, msg, since, job_id),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state='queued', phase=NULL, attempts=?, not_before=?, updated_at=?, pid=NULL, error=?,"
                    " outage_since=? WHERE id=?",
                    (attempts, now + delay, now, f"tracking server unavailable: {error}", since, job_id),
                )
            return self._get(db, job_id)

    def mark_done(self, job_id: int, run_id: str | None, result: dict[str, Any] | None, now: float | None = None) -> Job:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='done', phase=NULL, finished_at=?, updated_at=?, pid=NULL, run_id=?, result=?, error=NULL,"
                " outage_since=NULL WHERE id=?",
                (now, now, run_id, json.dumps(result, sort_keys=True) if result is not None else None, job_id),
            )
            return self._get(db, job_id)

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt after `attempts` failed ones: backoff_s * 2^(attempts-1), capped."""
        return min(self.backoff_s * (2 ** max(0, attempts - 1)), self.backoff_max_s)

    def mark_attempt_failed(
        self,
        job_id: int,
        error: str,
        retry: bool = True,
        count_attempt: bool = True,
        delay: float | None = None,
        now: float | None = None,
    ) -> Job:
        """After a failed attempt: back to queued with a backoff while attempts remain (and `retry`),
        else failed. `count_attempt=False` gives the attempt back (a shutdown or an unreachable
        MLflow, not the job's fault). `delay` overrides the backoff."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._get(db, job_id)
            attempts = job.attempts if count_attempt else max(0, job.attempts - 1)
            if retry and attempts < job.max_attempts:
                if delay is None:
                    delay = self.backoff(attempts) if count_attempt else 0.0
                db.execute(
                    "UPDATE jobs SET state='queued', phase=NULL, attempts=?, not_before=?, updated_at=?, pid=NULL, error=? WHERE id=?",
                    (attempts, now + delay, now, error, job_id),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state='failed', phase=NULL, attempts=?, finished_at=?, updated_at=?, pid=NULL, error=? WHERE id=?",
                    (attempts, now, now, error, job_id),
                )
            return self._get(db, job_id)

    def requeue_running(self, now: float | None = None) -> list[Job]:
        """Put every ``running`` job back to ``queued`` (at start: their service died). The attempt
        stays counted, so a job that kills the service every time still ends failed."""
        now = time.time() if now is None else now
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state='running'").fetchall()]
            out = []
            for job_id in ids:
                job = self._get(db, job_id)
                if job.attempts >= job.max_attempts:
                    db.execute(
                        "UPDATE jobs SET state='failed', phase=NULL, finished_at=?, updated_at=?, pid=NULL, error=? WHERE id=?",
                        (now, now, "the service stopped during every attempt", job_id),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state='queued', phase=NULL, not_before=?, updated_at=?, pid=NULL,"
                        " error='interrupted: the service stopped during the attempt' WHERE id=?",
                        (now, now, job_id),
                    )
                out.append(self._get(db, job_id))
            return out

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            try:
                return self._get(self._db, job_id)
            except KeyError:
                return None

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        with self._lock:
            if state:
                rows = self._db.execute("SELECT * FROM jobs WHERE state=? ORDER BY id DESC LIMIT ?", (state, limit)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            return [_job(r) for r in rows]

    def jobs_for(self, model_name: str, version: str, kind: str | None = None) -> builtins.list[Job]:
        with self._lock:
            if kind:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE model_name=? AND version=? AND kind=? ORDER BY id", (model_name, version, kind)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE model_name=? AND version=? ORDER BY id", (model_name, version)
                ).fetchall()
            return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({r["state"]: int(r["n"]) for r in rows})
        return out

    def next_due(self) -> float | None:
        """When the earliest queued job becomes due (Unix seconds), or None."""
        with self._lock:
            row = self._db.execute("SELECT MIN(not_before) FROM jobs WHERE state='queued'").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def _get(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["options"] = json.loads(d["options"] or "{}")
    d["result"] = json.loads(d["result"]) if d.get("result") else None
    return Job(**d)
