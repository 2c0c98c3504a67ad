"""The durable queue: dedup of deliveries, restart durability, retries with backoff, coalescing."""

from __future__ import annotations

import sqlite3

import pytest

from sae_mlops.service.policy import JobRequest
from sae_mlops.service.queue import JobQueue


def req(version="1", kind="quick", force=False, trigger="model_version.created", name="sae-a"):
    return JobRequest(name, version, kind, {"max_tokens": 1000}, trigger, force)


@pytest.fixture
def qpath(tmp_path):
    return tmp_path / "queue.db"


def test_wal_mode_and_schema(qpath):
    q = JobQueue(qpath)
    q.close()
    db = sqlite3.connect(qpath)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {"jobs", "deliveries", "meta"}


def test_duplicate_delivery_enqueues_once_and_survives_reopen(qpath):
    q = JobQueue(qpath)
    first = q.accept_delivery("d-1", "model_version.created", [req()], "accepted")
    assert not first.duplicate and len(first.created) == 1
    second = q.accept_delivery("d-1", "model_version.created", [req()], "accepted")
    assert second.duplicate and second.results == []
    q.close()
    q = JobQueue(qpath)  # a restarted service
    third = q.accept_delivery("d-1", "model_version.created", [req(force=True)], "accepted")
    assert third.duplicate
    assert q.counts()["queued"] == 1 and len(q.list()) == 1


def test_ignored_deliveries_are_remembered_too(qpath):
    q = JobQueue(qpath)
    q.accept_delivery("d-ignored", "model_version_tag.set", [], "ignored: own tag")
    assert q.seen_delivery("d-ignored")
    assert q.accept_delivery("d-ignored", "model_version_tag.set", [], "ignored").duplicate


def test_prune_forgets_old_delivery_ids(qpath):
    q = JobQueue(qpath)
    q.accept_delivery("old", "e", [], "x", now=1000.0)
    q.accept_delivery("new", "e", [], "x", now=5000.0)
    assert q.prune_deliveries(older_than=2000.0) == 1
    assert not q.seen_delivery("old") and q.seen_delivery("new")


def test_active_jobs_coalesce_and_done_ones_are_not_redone_unless_forced(qpath):
    q = JobQueue(qpath)
    a = q.enqueue(req())
    b = q.enqueue(req())
    assert a.created and not b.created and b.job_id == a.job_id and b.reason == "active"
    assert q.enqueue(req(kind="full")).created  # another kind is another job
    assert q.enqueue(req(version="2")).created
    job = q.claim("w")
    assert job.id == a.job_id
    assert q.enqueue(req(force=True)).reason == "active"  # running: still one at a time
    q.mark_done(job.id, "run-1", {"metrics": {}})
    again = q.enqueue(req())
    assert not again.created and again.reason == "done"
    forced = q.enqueue(req(force=True, trigger="tag:analyze=1"))
    assert forced.created and forced.job_id != a.job_id


def test_claim_order_attempts_and_running_state(qpath):
    q = JobQueue(qpath)
    ids = [q.enqueue(req(version=str(v)), now=100.0 + v).job_id for v in range(3)]
    job = q.claim("w0", now=200.0)
    assert job.id == ids[0] and job.state == "running" and job.attempts == 1 and job.worker == "w0"
    assert q.claim("w1", now=200.0).id == ids[1]
    assert q.counts() == {"queued": 1, "running": 2, "done": 0, "failed": 0}


def test_running_jobs_are_requeued_when_a_killed_service_restarts(qpath):
    q = JobQueue(qpath, max_attempts=3)
    jid = q.enqueue(req()).job_id
    q.claim("w")
    q.set_pid(jid, 4242)
    # The service dies here (no close, no mark_*). A new one opens the same file.
    q2 = JobQueue(qpath, max_attempts=3)
    requeued = q2.requeue_running()
    assert [j.id for j in requeued] == [jid]
    job = q2.get(jid)
    assert job.state == "queued" and job.attempts == 1 and job.pid is None and "interrupted" in job.error
    again = q2.claim("w")
    assert again.id == jid and again.attempts == 2


def test_a_job_that_kills_the_service_every_time_ends_failed(qpath):
    q = JobQueue(qpath, max_attempts=2)
    jid = q.enqueue(req()).job_id
    for _ in range(2):
        assert q.claim("w").id == jid
        q = JobQueue(qpath, max_attempts=2)
        q.requeue_running()
    assert q.get(jid).state == "failed"


def test_retries_back_off_exponentially_then_fail(qpath):
    q = JobQueue(qpath, max_attempts=3, backoff_s=10.0, backoff_max_s=15.0)
    jid = q.enqueue(req(), now=0.0).job_id
    q.claim("w", now=0.0)
    j = q.mark_attempt_failed(jid, "boom", now=100.0)
    assert j.state == "queued" and j.not_before == 110.0 and j.error == "boom"
    assert q.claim("w", now=109.0) is None  # not due yet
    assert q.next_due() == 110.0
    assert q.claim("w", now=110.0).attempts == 2
    j = q.mark_attempt_failed(jid, "boom", now=200.0)
    assert j.not_before == 215.0  # 20 s capped at 15 s
    q.claim("w", now=215.0)
    j = q.mark_attempt_failed(jid, "boom 3", now=300.0)
    assert j.state == "failed" and j.attempts == 3 and j.error == "boom 3"
    assert q.claim("w", now=10_000.0) is None


def test_permanent_failure_and_uncounted_attempts(qpath):
    q = JobQueue(qpath, max_attempts=3)
    jid = q.enqueue(req()).job_id
    q.claim("w")
    assert q.mark_attempt_failed(jid, "bad input", retry=False).state == "failed"

    jid2 = q.enqueue(req(version="2")).job_id
    q.claim("w", now=0.0)
    j = q.mark_attempt_failed(jid2, "MLflow down", count_attempt=False, delay=5.0, now=0.0)
    assert j.state == "queued" and j.attempts == 0 and j.not_before == 5.0


def test_done_job_keeps_run_and_result(qpath):
    q = JobQueue(qpath)
    jid = q.enqueue(req()).job_id
    q.claim("w")
    q.mark_done(jid, "run-9", {"metrics": {"sparsity/l0_mean": 3.0}})
    q.close()
    j = JobQueue(qpath).get(jid)
    assert j.state == "done" and j.run_id == "run-9" and j.result["metrics"]["sparsity/l0_mean"] == 3.0
    assert j.options == {"max_tokens": 1000} and j.key == ("sae-a", "1", "quick")
