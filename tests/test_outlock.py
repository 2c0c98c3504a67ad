"""One writer per output directory (`sae_mlops.outlock`), with real processes.

- a second command into an --out another process holds is refused: exit 2, one sentence naming the
  holder's PID, the holder's files untouched, the holder keeps its lock;
- the service's takeover kills an orphan holder on this host and takes the lock;
- an orphan whose lock was taken over (another node: no signal reaches it) stops at its next
  checkpoint write (`Fenced`) and writes nothing;
- the lock is re-entrant within its process (the service's job holds it around the analysis),
  except for a holder that was fenced;
- a command stopped by bad input leaves no lock file and no directory behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.outlock import LOCK_NAME, exclusive_out_dir, read_holder

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sae_mlops.outlock import exclusive_out_dir
    from sae_mlops.analyses.sharding import Checkpoint
    out = Path(sys.argv[1])
    with exclusive_out_dir(out):
        (out / "first.txt").write_text("the first command's file")
        ck = Checkpoint(out)
        ck.fingerprint = {"kind": "quick"}
        print("locked", flush=True)
        sys.stdin.readline()  # the test says when to write
        try:
            ck.save()
        except Exception as e:
            print(type(e).__name__, flush=True)
            sys.exit(3)
        print("saved", flush=True)
""")


def _start_holder(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the holder has the lock (or has died)
    assert line.strip() == "locked", line
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_a_second_command_into_the_same_out_is_refused_naming_the_first(tmp_path, monkeypatch):
    from sae_mlops.demo import demo_sae_path, ensure_demo_assets

    ensure_demo_assets()
    out = tmp_path / "out"
    first = _start_holder(out)
    try:
        monkeypatch.chdir(tmp_path)
        r = runner.invoke(app, ["quick", "--sae", str(demo_sae_path("standard")), "--model", "demo", "--no-track", "-q",
                                "--out", str(out)], terminal_width=400)
        assert r.exit_code == 2, r.output
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in r.output, r.output
        assert f"is in use by another sae-mlops command (PID {first.pid}" in errors[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "first.txt"]  # nothing of the first touched
        assert read_holder(out)["pid"] == first.pid
        # the first still holds it and writes its checkpoint when told
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "saved"
        assert first.wait(timeout=30) == 0
        assert (out / "_checkpoint" / "manifest.json").is_file() or any(out.rglob("manifest.json"))
        assert not (out / LOCK_NAME).exists()  # released and removed
    finally:
        _stop(first)


def test_the_services_takeover_kills_an_orphan_on_this_host(tmp_path):
    out = tmp_path / "job" / "out"
    orphan = _start_holder(out)
    try:
        started = time.monotonic()
        with exclusive_out_dir(out, take_over=True, wait_s=30) as token:
            assert orphan.wait(timeout=30) == -9  # SIGKILL
            assert read_holder(out)["token"] == token and read_holder(out)["pid"] == os.getpid()
        assert time.monotonic() - started < 30
    finally:
        _stop(orphan)


def test_an_orphan_that_lost_the_lock_stops_at_its_next_write(tmp_path):
    out = tmp_path / "job" / "out"
    orphan = _start_holder(out)
    try:
        # a retry on another node fences the directory: it writes its token into the lock file
        from sae_mlops.outlock import _write_holder

        _write_holder(out / LOCK_NAME, "retry-token", None)
        assert orphan.stdin is not None and orphan.stdout is not None
        orphan.stdin.write("go\n")
        orphan.stdin.flush()
        assert orphan.stdout.readline().strip() == "Fenced"
        assert orphan.wait(timeout=30) == 3
        assert not any(out.rglob("manifest.json"))  # it wrote nothing after the takeover
        assert read_holder(out)["token"] == "retry-token"  # and left the retry's lock file alone
    finally:
        _stop(orphan)


def test_the_lock_is_re_entrant_in_its_process_and_a_fenced_holder_cannot_re_enter(tmp_path):
    """The service's job holds its directory for a whole attempt, around the analysis that takes it again."""
    from sae_mlops.outlock import Fenced, _write_holder

    out = tmp_path / "job" / "out"
    with exclusive_out_dir(out, take_over=True) as token:
        with exclusive_out_dir(out, take_over=True) as inner:
            assert inner == token
        assert read_holder(out)["token"] == token  # leaving the inner block released nothing
        _write_holder(out / LOCK_NAME, "retry-token", None)  # a newer attempt fences this one
        with pytest.raises(Fenced):
            with exclusive_out_dir(out):
                pass
    assert read_holder(out)["token"] == "retry-token"  # the newer attempt's lock file is left alone


def test_bad_input_leaves_no_lock_and_no_directory(tmp_path, monkeypatch):
    from sae_mlops.demo import demo_sae_path, ensure_demo_assets

    ensure_demo_assets()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.json").write_text('["Hello"]')
    r = runner.invoke(app, ["quick", "--sae", str(demo_sae_path("standard")), "--model", "demo", "--no-track", "-q",
                            "--corpus", "short.json", "--out", "deep/er/out"], terminal_width=400)
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.json"]
