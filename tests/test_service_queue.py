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


def test_a_requeued_job_keeps_its_place(qpath):
    q = JobQueue(qpath, max_attempts=3, backoff_s=10.0)
    a = q.enqueue(req(version="1"), now=100.0).job_id
    b = q.enqueue(req(version="2"), now=101.0).job_id
    assert q.claim("w", now=102.0).id == a
    q.mark_unavailable(a, "down", delay=5.0, max_outage_s=60.0, now=103.0)  # MLflow down
    assert q.claim("w", now=104.0).id == b  # a is not due yet
    c = q.enqueue(req(version="3"), now=105.0).job_id
    assert q.claim("w", now=120.0).id == a  # due again: before c, enqueued later
    q.mark_attempt_failed(a, "crash", now=121.0)  # backoff 10 s
    assert q.claim("w", now=140.0).id == a and q.claim("w", now=140.0).id == c


def test_outage_is_timed_from_its_first_sighting_and_attempts_are_given_back(qpath):
    q = JobQueue(qpath, max_attempts=1)
    jid = q.enqueue(req(), now=0.0).job_id
    q.claim("w", now=0.0)
    j = q.mark_unavailable(jid, "refused", delay=1.0, max_outage_s=30.0, now=10.0)
    assert j.state == "queued" and j.attempts == 0 and j.outage_since == 10.0 and "unavailable" in j.error
    q.claim("w", now=20.0)
    j = q.mark_unavailable(jid, "refused", delay=1.0, max_outage_s=30.0, now=35.0)
    assert j.state == "queued" and j.outage_since == 10.0
    q.claim("w", now=40.0)
    q.tracking_ok(jid)  # MLflow answered: the outage is over
    assert q.get(jid).outage_since is None
    j = q.mark_unavailable(jid, "refused", delay=1.0, max_outage_s=30.0, now=50.0)
    assert j.state == "queued" and j.outage_since == 50.0
    q.claim("w", now=90.0)
    j = q.mark_unavailable(jid, "refused", delay=1.0, max_outage_s=30.0, now=90.0)
    assert j.state == "failed" and "unreachable for 40s (limit 30s)" in j.error and j.attempts == 0


def test_schema_1_queue_is_migrated(qpath):
    db = sqlite3.connect(qpath)
    q = JobQueue(qpath)
    jid = q.enqueue(req()).job_id
    q.close()
    db.execute("ALTER TABLE jobs DROP COLUMN phase")
    db.execute("ALTER TABLE jobs DROP COLUMN outage_since")
    db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    db.commit()
    db.close()
    q = JobQueue(qpath)
    assert q.get(jid).phase is None and q.claim("w").phase == "starting"
    assert q.job_key(jid).endswith(f":{jid}") and q.job_key(jid) == JobQueue(qpath).job_key(jid)
