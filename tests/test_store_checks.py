"""Every tracking store is checked within seconds before the work, and no credential is shown.

A real PostgreSQL cluster on loopback (from the installed binaries, `mlflow_servers.postgres_cluster`)
that asks TCP clients for a password: a wrong password is one sentence and exit 2 within seconds
(MLflow's own client retried for minutes), the password never appears in the message or the log;
the right one passes the check. `redact` and the logging filter are checked on their own too.
"""

from __future__ import annotations

import logging
import time

import pytest
from typer.testing import CliRunner

from mlflow_servers import postgres_cluster, postgres_missing
from sae_mlops.cli import app

PASSWORD = "Pg-s3cret-917"
WRONG = "Wrong-pw-4242"

runner = CliRunner()


@pytest.fixture(scope="module")
def pg_uri():
    reason = postgres_missing()
    assert reason is None, reason
    with postgres_cluster(password=PASSWORD) as uri:
        yield uri


@pytest.fixture()
def std_sae():
    from sae_mlops.demo import demo_sae_path, ensure_demo_assets

    ensure_demo_assets()
    return str(demo_sae_path("standard"))


@pytest.mark.timeout(180)
def test_wrong_password_is_one_masked_sentence_within_seconds(pg_uri, std_sae, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = pg_uri.replace(PASSWORD, WRONG)
    assert bad != pg_uri
    started = time.monotonic()
    r = runner.invoke(app, ["-v", "quick", "--sae", std_sae, "--model", "demo", "-q"],
                      env={"MLFLOW_TRACKING_URI": bad}, terminal_width=400)
    elapsed = time.monotonic() - started
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    assert "password for this user was refused" in errors[0]
    assert "sae_mlops:***@127.0.0.1" in errors[0]
    assert WRONG not in r.output and PASSWORD not in r.output
    assert "Traceback" not in r.output
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert list(tmp_path.iterdir()) == []  # nothing written: the check runs before the model loads


def test_the_right_password_passes_and_a_wrong_database_is_named(pg_uri):
    from sae_mlops.errors import TrackingError
    from sae_mlops.tracking.preflight import check_tracking_store

    assert check_tracking_store(pg_uri) == pg_uri
    with pytest.raises(TrackingError) as info:
        check_tracking_store(pg_uri.rsplit("/", 1)[0] + "/nodb")
    assert 'database "nodb" does not exist' in str(info.value)
    assert PASSWORD not in str(info.value)


def test_a_closed_port_is_reported_as_an_outage(pg_uri):
    from mlflow_servers import free_port
    from sae_mlops.errors import TrackingError
    from sae_mlops.tracking.preflight import check_tracking_store

    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        check_tracking_store(f"postgresql+psycopg2://u:{PASSWORD}@127.0.0.1:{free_port()}/db")
    assert time.monotonic() - started < 10
    assert "connection refused" in str(info.value) and PASSWORD not in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)  # the service retries it as an outage


def test_redact_masks_uri_passwords_pairs_and_secret_variables():
    from sae_mlops.redact import redact

    env = {"MLFLOW_TRACKING_TOKEN": "tok-abc123", "MY_SERVICE_API_KEY": "key-999", "HOME": "/root"}
    text = ("postgresql+psycopg2://bob:p%40ss@db:5432/x failed; host=db password=hunter2 user=bob; "
            "token tok-abc123 and key-999 in /root")
    out = redact(text, env)
    assert "p%40ss" not in out and "hunter2" not in out and "tok-abc123" not in out and "key-999" not in out
    assert "postgresql+psycopg2://bob:***@db:5432/x" in out and "password=***" in out
    assert "/root" in out  # not a secret
    assert redact("http://127.0.0.1:5000/health", env) == "http://127.0.0.1:5000/health"


def test_log_lines_and_tracebacks_are_masked(capsys, monkeypatch):
    from sae_mlops.logging_setup import setup_logging

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "envpass-77")
    setup_logging(verbose=True)
    log = logging.getLogger("sae_mlops.test_store_checks")
    log.info("connecting to %s", f"postgresql://bob:{PASSWORD}@db/x")
    try:
        raise RuntimeError("server said: bad credentials envpass-77")
    except RuntimeError:
        log.exception("call failed")
    err = capsys.readouterr().err
    assert "bob:***@db" in err and "call failed" in err and "bad credentials ***" in err
    assert PASSWORD not in err and "envpass-77" not in err
