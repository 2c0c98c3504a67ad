"""Is the tracking store usable? Asked before the model loads, answered within a few seconds.

MLflow's own client retries a refused connection for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
with backoff: ~4.4 min by default) before it fails with chained tracebacks. `check_tracking_store`
asks once, with a short timeout, and raises `TrackingError` with one sentence instead:

- ``http(s)://`` server: ``GET <uri>/health`` (MLflow's health endpoint); any HTTP answer below 500
  counts as reachable (401/403/404 mean a server is there; what it allows is MLflow's business),
  a refused connection, a timeout, a DNS failure or a 5xx does not.
- ``sqlite:///path`` and local file stores: the store's directory must exist or be creatable.
- SQL databases (``postgresql[+driver]://``, ``mysql[+driver]://``, ``mssql+...://``): the
  SQLAlchemy dialect and its driver must import (a missing driver is named, with the package to
  install), then one connection with the driver's own short ``connect_timeout`` (not MLflow's
  retries, which take minutes on a wrong password): a refused password, an unknown database, a
  refused connection or no answer is one sentence.
- anything else (``databricks``...): not checked.

Every message shows the URI through `sae_mlops.redact.redact` (the password is masked).

`mark_killed` sets a run's status to KILLED (used when the user interrupts a command), within a
deadline; `open_store` loads the store's client early so that it can.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from sae_mlops.errors import TrackingError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0


def tracking_uri() -> str:
    """The tracking URI MLflow will use (``MLFLOW_TRACKING_URI``, else MLflow's default)."""
    import mlflow

    return mlflow.get_tracking_uri()


def describe_uri(uri: str) -> str:
    """`uri` (its password masked) and where it came from, for messages."""
    from sae_mlops.redact import redact

    safe = redact(uri)
    return f"{safe} (MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") else f"{safe} (MLflow's default)"


def check_tracking_store(uri: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, no_track_option: bool = False) -> str:
    """Raise `TrackingError` unless the tracking store at `uri` (default: the current one) is
    usable; return the URI. Takes at most about `timeout_s` seconds. `no_track_option`: the command
    has --no-track (the message then offers it)."""
    uri = uri or tracking_uri()
    alternative = ", or pass --no-track" if no_track_option else ""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s, alternative)
    elif scheme.split("+", 1)[0] in SQL_BACKENDS:
        _check_sql(uri, timeout_s, alternative)
    elif scheme == "sqlite":
        path = parsed.path
        if path and path != "/:memory:" and not path.startswith("/:memory:"):
            _check_local(uri, Path(path).parent, alternative)
    elif scheme in ("", "file"):
        _check_local(uri, Path(parsed.path if scheme == "file" else uri), alternative)
    return uri


def _check_server(uri: str, timeout_s: float, alternative: str) -> None:
    import requests

    url = uri.rstrip("/") + "/health"
    fix = f"start the server or point MLFLOW_TRACKING_URI at a running one{alternative}"
    # The cause stays chained (the service sorts a TrackingError by it: connection error or timeout
    # = unavailable, retried without using an attempt); the CLI shows only the sentence.
    try:
        response = requests.get(url, timeout=timeout_s, allow_redirects=False)
    except requests.Timeout as e:
        raise TrackingError(f"MLflow tracking server {describe_uri(uri)} did not answer within {timeout_s:g} s; {fix}.") from e
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {describe_uri(uri)} is not reachable ({_reason(e)}); {fix}.") from e
    if response.status_code >= 500:
        raise TrackingError(
            f"MLflow tracking server {describe_uri(uri)} answers HTTP {response.status_code} on /health; {fix}."
        ) from ConnectionError(f"HTTP {response.status_code} from {url}")
    log.debug("tracking server %s answered HTTP %d on /health", uri, response.status_code)


#: SQLAlchemy backends MLflow's SQL store accepts (besides sqlite, which is a local file)
SQL_BACKENDS = ("postgresql", "postgres", "mysql", "mariadb", "mssql")
#: the pip package of a SQLAlchemy driver module, for the "install it" hint
_DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000",
                    "asyncpg": "asyncpg", "pymysql": "PyMySQL", "MySQLdb": "mysqlclient", "mysql": "mysql-connector-python",
                    "mariadb": "mariadb", "pyodbc": "pyodbc", "pymssql": "pymssql"}


def _check_sql(uri: str, timeout_s: float, alternative: str) -> None:
    """The driver imports and one connection succeeds within about `timeout_s` seconds (see the
    module docstring). The cause stays chained: a refused connection or a timeout is a
    `ConnectionError` (the service retries it as an outage), anything else is the driver's error."""
    import math

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    where = f"the MLflow store {describe_uri(uri)}"
    fix = f"fix MLFLOW_TRACKING_URI{alternative}"
    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise TrackingError(f"{where} is not a database URL SQLAlchemy knows ({_first_line(e)}); {fix}.") from e
    try:
        dialect.import_dbapi()
    except ImportError as e:
        module = (e.name or str(e)).split(".")[0]
        package = _DRIVER_PACKAGES.get(module, module)
        raise TrackingError(
            f"{where} needs the database driver {module} ({url.get_backend_name()}+{url.get_driver_name()}), which is not "
            f"installed; install it with `pip install {package}`, or {fix}."
        ) from e
    seconds = max(2, math.ceil(timeout_s))
    timeout_arg = {"pg8000": "timeout", "pyodbc": "timeout", "pymssql": "login_timeout"}.get(url.get_driver_name(),
                                                                                           "connect_timeout")
    try:
        engine = create_engine(url, poolclass=NullPool, connect_args={timeout_arg: seconds})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except DBAPIError as e:
        reason, unavailable = _sql_reason(e, seconds)
        cause: BaseException = ConnectionError(reason) if unavailable else e
        raise TrackingError(f"{where} refused the connection or did not answer ({reason}); {fix}.") from cause
    except SQLAlchemyError as e:
        raise TrackingError(f"{where} cannot be used ({_first_line(e)}); {fix}.") from e
    log.debug("SQL tracking store %s answered", describe_uri(uri))


def _sql_reason(e: Exception, seconds: int) -> tuple[str, bool]:
    """A short cause of a failed database connection, and whether it looks like an outage (retry)."""
    from sae_mlops.redact import redact

    text = str(getattr(e, "orig", None) or e)
    low = text.lower()
    for needle, short, outage in (
        ("password authentication failed", "the password for this user was refused", False),
        ("access denied for user", "the password for this user was refused", False),
        ("no password supplied", "the server asks for a password and the URI has none", False),
        ("does not exist", "", False),
        ("connection refused", "connection refused", True),
        ("timeout expired", f"no answer within {seconds} s", True),
        ("timed out", f"no answer within {seconds} s", True),
        ("could not translate host name", "unknown host", True),
        ("name or service not known", "unknown host", True),
        ("no route to host", "no route to host", True),
        ("network is unreachable", "network unreachable", True),
    ):
        if needle in low:
            return (short or redact(_first_line(text))), outage
    return redact(_first_line(text)), False


def _first_line(e: object) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _check_local(uri: str, directory: Path, alternative: str) -> None:
    from sae_mlops.preflight import out_dir_problem

    problem = out_dir_problem(directory)
    if problem:
        raise TrackingError(
            f"the MLflow store {describe_uri(uri)} cannot be created or written ({problem}); "
            f"fix MLFLOW_TRACKING_URI{alternative}."
        )


def _reason(e: Exception) -> str:
    """A short cause: 'connection refused', 'name or service not known'... rather than urllib3's chain."""
    text = str(e)
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("SSLError", "TLS error"),
    ):
        if needle in text:
            return short
    return type(e).__name__


MARK_KILLED_TIMEOUT_S = 15.0


def open_store() -> None:
    """Load the current tracking store's client now (cached by MLflow per URI). For a SQL store this
    imports SQLAlchemy and Alembic and checks the schema: seconds on an idle machine, tens of seconds
    on a loaded one. Done before the model loads when the run exists beforehand (``MLFLOW_RUN_ID``),
    so that a Ctrl-C at any later point can mark that run KILLED at once (`mark_killed`). Never
    raises: a store that fails here fails where the run is used, with that step's message."""
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient()  # builds (and caches) the store
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.debug("loading the tracking store failed: %s", e)


def mark_killed(run_id: str, timeout_s: float = MARK_KILLED_TIMEOUT_S) -> bool:
    """Set run `run_id` to KILLED if it is still RUNNING; True when it is KILLED now. Never raises,
    and returns within about `timeout_s` seconds (False when the store took longer): this runs while
    a command is being interrupted, and neither a store that is down nor one still loading may hold
    the user's Ctrl-C. The work runs in a daemon thread, so a second Ctrl-C ends the wait at once."""
    import threading

    done: list[bool] = []

    def mark() -> None:
        try:
            from mlflow.tracking import MlflowClient

            check_tracking_store(timeout_s=2.0)  # MLflow's client would retry a dead server for minutes
            client = MlflowClient()
            status = client.get_run(run_id).info.status
            if status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
            done.append(status in ("RUNNING", "KILLED"))
        except Exception as e:  # noqa: BLE001 - reported, not raised (see the docstring)
            log.debug("could not mark run %s KILLED: %s", run_id, e)

    worker = threading.Thread(target=mark, name="mark-killed", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.debug("marking run %s KILLED took longer than %g s; given up", run_id, timeout_s)
    return bool(done and done[0])
