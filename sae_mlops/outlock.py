"""One writer per output directory: an exclusive lock held for a whole analysis (or resume), and a
fence that stops an orphaned writer.

`exclusive_out_dir(out)` creates ``out`` if needed and takes an exclusive ``fcntl.flock`` on
``out/.sae-mlops.lock`` for the duration of the ``with`` block; the lock file records the holder
(PID, host, start time, a random token). A second command into the same ``out`` gets an
`OutDirBusy` (an `InputError`: one sentence naming the first command's PID, exit 2) before it
touches anything there. The kernel drops the lock when its process dies, so a crashed or killed
command never leaves a stale lock. On leaving, the lock file is removed, and so are the
directories the call created when they are still empty (a command that stopped on bad input
leaves nothing behind).

Fencing (``take_over=True``, used by the service, which owns its job directories): a new attempt
of a job does not wait for an orphan of an earlier attempt (e.g. a Ray worker whose service was
killed). It SIGKILLs the holder when that process runs on this host, waits for the lock, and in
any case writes its own token into the lock file. `check_fence(out)` (called by the checkpoint
before every write, and before the outputs are written and logged) raises `Fenced` in a process
whose token is no longer the one in the lock file, so an orphan on another node (where neither the
signal nor, on some network file systems, the flock reaches) stops at its next write.

Hand-written with ``fcntl`` (not the ``filelock`` package) because the holder's PID must be read by
the refused command and a takeover must rewrite the token while another process holds the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".sae-mlops.lock"
TAKEOVER_WAIT_S = 30.0

_owned: dict[str, str] = {}  # resolved output directory -> this process's token


class OutDirBusy(InputError):
    """Another command is writing into the output directory."""


class Fenced(RuntimeError):
    """This process lost its output directory to a newer attempt; it must not write there any more."""


def _key(out: Path) -> str:
    return str(Path(out).resolve())


def read_holder(out: Path) -> dict[str, Any]:
    """What the lock file of ``out`` says about its holder ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(out) / LOCK_NAME).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (the file the path names now), or None when busy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock: again


def _write_holder(path: Path, token: str, fd: int | None) -> None:
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if fd is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data.encode("utf-8"), 0)
        os.fsync(fd)
    else:  # fencing without the flock: replace the file's content for the orphan to read
        tmp = path.with_name(f"{LOCK_NAME}.{token}")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)


def _busy_message(out: Path, option: str, holder: dict[str, Any]) -> str:
    pid = holder.get("pid", "unknown")
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f" since {holder['started']}" if holder.get("started") else ""
    return (f"{option} {out} is in use by another sae-mlops command (PID {pid}{where}{since}); wait for it to finish "
            f"or stop it, or choose another {option}.")


@contextlib.contextmanager
def exclusive_out_dir(out: Path | str, *, option: str = "--out", take_over: bool = False,
                      wait_s: float = TAKEOVER_WAIT_S) -> Iterator[str]:
    """Hold ``out`` for this process (see the module docstring); yields this holder's token.

    take_over: the caller owns ``out`` and any holder is an orphan of an earlier attempt: kill it
    (same host), wait up to `wait_s` s for its lock, then fence it with this holder's token.

    Re-entrant: in a process that holds ``out`` already (the service's job holds it for a whole
    attempt, around the analysis that takes it again), it yields the same token after `check_fence`."""
    out = Path(out)
    if _key(out) in _owned:
        check_fence(out)
        yield _owned[_key(out)]
        return
    created: list[Path] = []
    p = out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    token = uuid.uuid4().hex
    fd = _try_lock(path)
    if fd is None:
        holder = read_holder(out)
        if not take_over:
            _remove_created(created)
            raise OutDirBusy(_busy_message(out, option, holder))
        fd = _take_over(out, path, holder, wait_s)
        _write_holder(path, token, fd)
        log.warning("%s taken over from PID %s (an earlier attempt's orphan): it can no longer write there", out,
                    holder.get("pid"))
    else:
        _write_holder(path, token, fd)
    _owned[_key(out)] = token
    try:
        yield token
    finally:
        _owned.pop(_key(out), None)
        if read_holder(out).get("token") == token:
            with contextlib.suppress(OSError):
                path.unlink()
        if fd is not None:
            os.close(fd)
        _remove_created(created)


def _take_over(out: Path, path: Path, holder: dict[str, Any], wait_s: float) -> int | None:
    pid = holder.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and holder.get("host") == socket.gethostname() and _pid_alive(pid):
        log.warning("%s is held by PID %d (an earlier attempt's orphan); killing it", out, pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while True:
        fd = _try_lock(path)
        if fd is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if fd is None:
        log.warning("%s is still locked by %s after %.0f s; fencing it (it stops at its next write)", out,
                    holder.get("pid"), wait_s)
    return fd


def _remove_created(created: list[Path]) -> None:
    """Remove the directories a call created (deepest first) while they are empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            return


def check_fence(out: Path | str) -> None:
    """`Fenced` when this process holds ``out`` (`exclusive_out_dir`) but a newer attempt took it
    over; nothing when this process does not hold it (a test, a library call without the lock)."""
    token = _owned.get(_key(Path(out)))
    if token is None:
        return
    current = read_holder(Path(out)).get("token")
    if current != token:
        raise Fenced(f"{out} was taken over by a newer attempt (lock holder {read_holder(Path(out)).get('pid')}); "
                     "this attempt stops without writing.")


def is_lock_file(path: Path) -> bool:
    """True for the lock file (and a takeover's temporary copy): not an output of the analysis."""
    return path.name.startswith(LOCK_NAME)
