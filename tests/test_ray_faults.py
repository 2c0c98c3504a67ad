"""Ray faults on a local instance the tool starts itself (no --ray-address):

- every server of that instance (GCS, raylet, object manager, agents, workers) listens on 127.0.0.1
  only: the listening sockets of its processes (``ss -ltnp``) are all loopback;
- an actor killed (SIGKILL) while it runs a shard does not fail the analysis: the shard runs again
  on a new actor and the result equals the local pass.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sae_mlops.config import AnalysisConfig, ExecutionOptions
from sae_mlops.demo import demo_sae_path
from sae_mlops.workflows import run_quick_and_log

SAE = str(demo_sae_path("batchtopk"))


def _cfg() -> AnalysisConfig:
    return AnalysisConfig(sae=SAE, model="demo", max_tokens=12_000, batch_size=2, progress=False)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> set[int]:
    """`root` and every process below it (by /proc's parent pids), plus processes naming `marker`."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


@pytest.mark.timeout(300)
def test_a_local_ray_instance_listens_on_loopback_only(tmp_path):
    import ray

    from sae_mlops.analyses.ray_shards import restore_env, start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    temp = f"/tmp/smr-{os.getpid()}"  # short: Ray's unix socket paths must stay under 108 bytes
    previous = start_local_ray(1, temp_dir=temp)
    try:
        @ray.remote
        def ping() -> int:
            return os.getpid()

        worker = ray.get(ping.remote(), timeout=120)  # a worker is up too
        # at normal priority: Ray's default nice 15 starves the actors on a loaded machine
        assert int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[16]) == 0
        # Ray's servers run below the processes ray.init started: this process's children (raylet,
        # gcs_server) and theirs; plus anything naming this session's temp dir
        pids = _descendants(os.getpid()) | {int(d.name) for d in Path("/proc").iterdir()
                                             if d.name.isdigit() and temp in _cmdline(int(d.name))}
        pids.discard(os.getpid())
        lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
        ours = [ln for ln in lines if any(int(p) in pids for p in re.findall(r"pid=(\d+)", ln))]
        assert len(ours) >= 3, f"expected Ray's servers among {lines}"
        exposed = [ln for ln in ours if not re.search(r"\s(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+\s", ln)]
        assert not exposed, f"Ray servers listening beyond loopback: {exposed}"
    finally:
        ray.shutdown()
        restore_env(previous)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.mark.timeout(600)
def test_an_actor_killed_mid_shard_is_replaced_and_its_shard_retried(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    local = run_quick_and_log(_cfg(), tmp_path / "local", track=False)
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_running_shard() -> None:
        deadline = time.monotonic() + 400
        while not stop.is_set() and time.monotonic() < deadline:
            for d in Path("/proc").iterdir():
                if d.name.isdigit() and _cmdline(int(d.name)).startswith("ray::ShardWorker.run"):
                    os.kill(int(d.name), signal.SIGKILL)
                    killed.append(int(d.name))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_running_shard, daemon=True)
    killer.start()
    try:
        outcome = run_quick_and_log(_cfg(), tmp_path / "ray", track=False,
                                    exec_opts=ExecutionOptions(shard_tokens=1, executor="ray", workers=1))
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no shard was running to kill"
    assert outcome.result.params["shards"] >= 3
    for k, v in local.result.metrics.items():
        if k.startswith(("sparsity/", "recon/", "downstream/", "features/")) and isinstance(v, float):
            assert outcome.result.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.timeout(300)
def test_inputs_refused_while_ray_starts_leave_no_ray_behind(tmp_path):
    """The local instance starts in the background while the inputs load (prestart_local_ray); when
    the inputs are refused, the instance is stopped before the error reaches the user."""
    import ray

    from sae_mlops.analyses import ray_shards
    from sae_mlops.errors import InputError

    if ray.is_initialized():
        ray.shutdown()
    bad = AnalysisConfig(sae=SAE, model="demo", hook="blocks.0.hook_nowhere", max_tokens=2000, progress=False)
    with pytest.raises(InputError, match="hook_nowhere"):
        run_quick_and_log(bad, tmp_path / "x", track=False, exec_opts=ExecutionOptions(executor="ray", workers=1))
    assert not ray.is_initialized() and ray_shards._prestarted is None
    deadline = time.monotonic() + 60
    while any("raylet" in _cmdline(p) or "gcs_server" in _cmdline(p) for p in _descendants(os.getpid()) - {os.getpid()}):
        assert time.monotonic() < deadline, "Ray's processes outlived the refused analysis"
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_actors_started_with_ray_run_the_shards_and_extra_ones_are_stopped(tmp_path, caplog):
    """A prestarted local instance creates its actors while the driver loads its inputs (their imports
    overlap the driver's); `run_ray` loads them. With fewer shards than workers, the extra actor is
    stopped and the result equals the local pass."""
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    local = run_quick_and_log(_cfg(), tmp_path / "local", track=False)
    with caplog.at_level(logging.INFO, logger="sae_mlops.analyses.ray_shards"):
        outcome = run_quick_and_log(_cfg(), tmp_path / "ray", track=False,
                                    exec_opts=ExecutionOptions(shard_tokens=10**9, executor="ray", workers=2))
    assert outcome.result.params["shards"] == 1
    assert "1 of the 2 actors created while the inputs loaded" in caplog.text
    assert not ray.is_initialized()
    for k, v in local.result.metrics.items():
        if k.startswith(("sparsity/", "recon/", "downstream/", "features/")) and isinstance(v, float):
            assert outcome.result.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.timeout(300)
def test_closing_an_actor_removes_its_temporary_folder():
    import ray

    from sae_mlops.analyses.quick import prepare
    from sae_mlops.analyses.ray_shards import _actor_config, _close_actors, _worker_class, restore_env, start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    inputs = prepare(_cfg())
    cfg, sae_files = _actor_config(inputs)
    assert sae_files  # the demo SAE is a local directory: its files travel to the actor
    previous = start_local_ray(1)
    try:
        actor = _worker_class(ExecutionOptions(executor="ray", workers=1)).remote(1)
        pid = ray.get(actor.load.remote(cfg, "quick", None, inputs.corpus, sae_files), timeout=180)
        tmp = Path(ray.get(actor.__ray_call__.remote(lambda self: str(self.tmp)), timeout=60))
        assert pid != os.getpid() and (tmp / "sae").is_dir()
        _close_actors([actor], busy=set())
        assert not tmp.exists()
    finally:
        ray.shutdown()
        restore_env(previous)


@pytest.mark.timeout(300)
def test_stopping_a_local_instance_kills_its_monitor_first():
    """`stop_local_ray` kills Ray's autoscaler monitor before ``ray.shutdown``: on SIGTERM the
    monitor reports to the GCS, which Ray has stopped by then, and Ray waits 1 s for it. Fails if
    Ray's node object no longer lets the monitor be reached (the shutdown then is Ray's own)."""
    import ray
    from ray._private import ray_constants, worker

    from sae_mlops.analyses.ray_shards import restore_env, start_local_ray, stop_local_ray

    if ray.is_initialized():
        ray.shutdown()
    previous = start_local_ray(1)
    try:
        node = worker._global_node
        monitor = node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process
        gcs = node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process
        assert monitor.poll() is None and gcs.poll() is None
        assert stop_local_ray() is True
        assert monitor.returncode == -signal.SIGKILL
        assert gcs.poll() is not None and not ray.is_initialized()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        restore_env(previous)


def test_the_ray_executor_module_imports_without_torch():
    """The workflows start a local Ray instance (`local_ray_prestarted`) before their heavy imports,
    so that Ray's start overlaps them; that needs the Ray executor's module to import neither torch
    nor Ray itself."""
    import sys

    code = ("import sys, sae_mlops.analyses.ray_shards, sae_mlops.workflows; "
            "print(sorted(m for m in ('torch', 'ray', 'transformer_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.timeout(300)
def test_a_ray_analysis_starts_ray_before_importing_torch(tmp_path):
    """`run_quick_and_log` with ``--executor ray`` starts the local instance before it imports torch
    and TransformerLens (in a fresh process, where nothing has imported them yet)."""
    import sys

    code = f"""
import sys
from sae_mlops.analyses import ray_shards
seen = []
original = ray_shards.LocalRayStart.__init__
def init(self, exec_opts):
    seen.append(sorted(m for m in ("torch", "transformer_lens") if m in sys.modules))
    original(self, exec_opts)
ray_shards.LocalRayStart.__init__ = init
from sae_mlops.config import AnalysisConfig, ExecutionOptions
from sae_mlops.workflows import run_quick_and_log
cfg = AnalysisConfig(sae={SAE!r}, model="demo", max_tokens=2000, batch_size=2, progress=False)
out = run_quick_and_log(cfg, {str(tmp_path / "ray")!r}, track=False, exec_opts=ExecutionOptions(executor="ray", workers=1))
assert out.result.metrics["tokens/analysed"] >= 2000, out.result.metrics
print("SEEN", seen)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SEEN [[]]" in res.stdout, res.stdout + res.stderr[-2000:]
