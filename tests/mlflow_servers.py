"""Real tracking servers for the lineage tests: ``mlflow server`` on 127.0.0.1 with a SQL backend
(sqlite, or a PostgreSQL cluster started from the installed binaries in a temporary directory).

Every wait is bounded and every process started here is stopped by the context managers, also when
a test fails. PostgreSQL refuses to run as root: when the tests run as root, the cluster runs as
the ``postgres`` (else ``nobody``) user, in a temporary directory owned by that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SERVER_START_TIMEOUT_S = 120
PG_START_TIMEOUT_S = 60


# Ports for the servers the tests start (in other processes, so the port must be passed as a number):
# a block of 1000 per pytest-xdist worker in 20000-29999, below Linux's ephemeral range (32768-60999),
# so that neither an outgoing connection nor another worker's server can take a port between the
# check here and the server's own bind. Within a block the ports are handed out in turn.
PORT_BASE, PORT_BLOCK = 20000, 1000
_next_port = [random.Random(os.getpid()).randrange(PORT_BLOCK)]


def free_port() -> int:
    """A loopback port nothing listens on, from this worker's block (see above); checked by binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) if worker[2:].isdigit() else 0
    start = PORT_BASE + (n % 10) * PORT_BLOCK
    for _ in range(PORT_BLOCK):
        port = start + _next_port[0] % PORT_BLOCK
        _next_port[0] += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + PORT_BLOCK - 1}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def mlflow_server(backend_uri: str, workdir: Path) -> Iterator[str]:
    """``mlflow server`` on a free loopback port with `backend_uri`; yields its http URI."""
    port = free_port()
    log_path = workdir / f"mlflow-server-{port}.log"
    artifacts = workdir / "server-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up after {SERVER_START_TIMEOUT_S}s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield uri
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn workers included), SIGKILL after 3 s (a server
    holding PostgreSQL connections can take much longer to exit on its own; its state is thrown away)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL backend cannot be started here, or None."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if postgres_bin(name) is None:
            return f"PostgreSQL binary {name} not found"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (make install)"
    if os.geteuid() == 0 and _service_user() is None:
        return "running as root and no postgres/nobody user to run the cluster as"
    return None


def _service_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


@contextlib.contextmanager
def postgres_cluster(password: str | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port with a database ``mlflow``; yields its
    SQLAlchemy URI. The cluster lives in a fresh temporary directory, removed afterwards.
    password: TCP connections must then give it (scram-sha-256; the yielded URI holds it)."""
    import psycopg2

    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    assert initdb and pg_ctl
    root = Path(tempfile.mkdtemp(prefix="sae_mlops_pg_"))
    data, sock, log_path = root / "data", root / "sock", root / "postgres.log"
    sock.mkdir()
    kwargs: dict = {}
    if os.geteuid() == 0:
        user = _service_user()
        assert user is not None
        for path in (root, sock):
            os.chown(path, user.pw_uid, user.pw_gid)
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_"))}
    env["LANG"] = "C"
    port = free_port()
    started = False
    try:
        auth = ["--auth=trust"]
        if password is not None:
            pwfile = root / "pwfile"
            pwfile.write_text(password + "\n")
            if kwargs:
                os.chown(pwfile, kwargs["user"], kwargs["group"])
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        subprocess.run(
            [initdb, "-D", str(data), "-U", "sae_mlops", *auth, "-E", "UTF8", "--no-locale", "--no-sync"],
            check=True, capture_output=True, cwd=root, env=env, timeout=120, **kwargs,
        )
        options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        started = True
        subprocess.run(
            [pg_ctl, "-D", str(data), "-o", options, "-l", str(log_path), "-w", "-t", str(PG_START_TIMEOUT_S), "start"],
            check=True, capture_output=True, cwd=root, env=env, timeout=PG_START_TIMEOUT_S + 30, **kwargs,
        )
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="sae_mlops", dbname="postgres", connect_timeout=10,
                                password=password)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CREATE DATABASE mlflow")
        finally:
            conn.close()
        user = "sae_mlops" if password is None else f"sae_mlops:{password}"
        yield f"postgresql+psycopg2://{user}@127.0.0.1:{port}/mlflow"
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"PostgreSQL failed ({exc.cmd[0]}): {exc.stderr.decode(errors='replace')[-2000:]}\n{_tail(log_path)}"
        ) from None
    finally:
        if started:
            _stop_postgres(pg_ctl, data, root, env, kwargs)
        shutil.rmtree(root, ignore_errors=True)


def _stop_postgres(pg_ctl: str, data: Path, root: Path, env: dict, kwargs: dict) -> None:
    try:
        subprocess.run(
            [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"],
            capture_output=True, cwd=root, env=env, timeout=60, **kwargs,
        )
    except (subprocess.SubprocessError, OSError):
        pass
    pid_file = data / "postmaster.pid"
    if pid_file.is_file():  # still running: kill the postmaster
        with contextlib.suppress(ValueError, OSError, IndexError):
            os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGKILL)
