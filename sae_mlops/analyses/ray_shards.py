"""The Ray executor: shards of one pass on Ray actors, merged by the driver in shard order.

Each actor (:class:`ShardWorker`) loads the model and the SAE once, then processes shards: it runs
a shard with fresh collectors (:func:`sae_mlops.analyses.sharding.run_shard`) in a temporary
directory of its node and returns the shard's files (collector state, activation-database parts) as
bytes through Ray's object store. The driver writes them into the checkpoint and records the shard
as done, so nothing needs a shared filesystem for outputs: on a multi-node cluster the database
parts travel through the object store to the driver's ``--out``.

Inputs reach the actors as follows: the corpus texts and (for a local or MLflow SAE) the SAE
directory's files go through the object store; the model is loaded by each actor from what
``--model`` names (a TransformerLens name, fetched on each node, or a local checkpoint directory that
must exist at the same path on every node, e.g. on a shared filesystem).

Why an actor pool and not Ray Data: shards must be cut at whole batches for BatchTopK and
merged in order with state that is not a table; a few actors with ``ray.util.ActorPool`` are the
whole mechanism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_mlops.errors import InputError

if TYPE_CHECKING:
    from sae_mlops.analyses.quick import Inputs
    from sae_mlops.analyses.sharding import Checkpoint, CollectorFactory, PassObserver, ShardedPass
    from sae_mlops.config import ExecutionOptions, FullOptions
    from sae_mlops.core.tokens import ShardSpec

# torch, the analyses and Ray are imported where they are used: this module is imported before the
# driver's own heavy imports, so that a local Ray instance starts at once (`prestart_local_ray`)

log = logging.getLogger(__name__)


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class ShardWorker:
    """A Ray actor: created bare, then :meth:`load` loads the model and the SAE once, then one shard
    per :meth:`run` call.

    Creating it imports torch, TransformerLens and the analysis modules (most of an actor's start:
    about 3 s of a 4-5 s start on a CPU). A local instance started in the background
    (`prestart_local_ray`) creates its actors as soon as Ray is up, so that these imports overlap the
    driver's own loading of model, SAE and corpus; `load` then only reads the weights."""

    def __init__(self, threads: int):
        import torch
        import transformer_lens  # noqa: F401 - the heavy import, paid while the driver loads its inputs

        from sae_mlops.analyses import quick, sharding  # noqa: F401
        from sae_mlops.core import engine  # noqa: F401
        from sae_mlops.sources import model, sae, validate  # noqa: F401

        torch.set_num_threads(threads)
        self.tmp: Path | None = None

    def load(self, cfg: Any, kind: str, opts: FullOptions | None, corpus: Any, sae_files: dict[str, bytes] | None) -> int:
        """Load model and SAE (the SAE directory's files, when given, are written to a temporary
        directory of this node first); returns the actor's pid."""
        from sae_mlops.analyses.quick import _prepare
        from sae_mlops.analyses.sharding import make_collectors
        from sae_mlops.core.engine import Engine
        from sae_mlops.sources.model import load_model
        from sae_mlops.sources.sae import load_sae
        from sae_mlops.sources.validate import check_compatible

        self.tmp = Path(tempfile.mkdtemp(prefix="sae-mlops-worker-"))
        if sae_files is not None:
            _write_tree(self.tmp / "sae", sae_files)
            cfg = dataclasses.replace(cfg, sae=str(self.tmp / "sae"))
        self.inputs = _prepare(cfg, lambda *_a, **_k: corpus, load_model, load_sae, check_compatible)
        self.engine = Engine(self.inputs.model.model, self.inputs.sae.module, self.inputs.site, self.inputs.device)
        self.kind, self.opts = kind, opts
        self.make_collectors = make_collectors
        return os.getpid()

    def run(self, spec: ShardSpec, blocks: Any = None) -> dict[str, Any]:
        """Run one shard (``blocks``: the pass's block layout, for the per-block statistics); return
        its index, files (relative path -> bytes) and pass stats."""
        import resource

        from sae_mlops.analyses.sharding import run_shard

        work = Path(tempfile.mkdtemp(dir=self.tmp))
        try:
            def factory(parts_dir: Path | None, prefix: str):
                return self.make_collectors(self.kind, self.inputs, self.opts, parts_dir, prefix, blocks=blocks)

            _collectors, stats = run_shard(self.engine, self.inputs, spec, factory, work, save=True)
            files = _read_tree(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return {"index": spec.index, "files": files, "stats": dataclasses.asdict(stats), "peak_rss_mib": peak,
                "pid": os.getpid()}

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _actor_config(inputs: Inputs) -> tuple[Any, dict[str, bytes] | None]:
    """The analysis config an actor loads from (the driver's resolved model and threshold) and the
    SAE directory's files when the SAE is a local directory (None: a release, loaded by name)."""
    cfg, info = inputs.cfg, inputs.sae.info
    changes: dict[str, Any] = {"model": inputs.model.name, "progress": False}
    if info.topk_mode == "threshold" and info.threshold is not None:
        changes["threshold"] = info.threshold
    sae_files = None
    if info.local_path is not None and Path(info.local_path).is_dir() and info.format != "saelens-release":
        sae_files = _read_tree(Path(info.local_path))
    return dataclasses.replace(cfg, **changes), sae_files


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """`InputError` unless something accepts TCP connections at ``address`` (``host:port`` or
    ``ray://host:port``; ``auto`` is left to Ray) within ``timeout_s``: ``ray.init`` retries an address
    where nothing listens for minutes before it fails."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray-address {address} is not host:port, ray://host:port or auto.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(f"cannot connect to the Ray cluster at {address} ({e.strerror or e}); start one with "
                         "`ray start --head` or leave --ray-address out to start a local Ray instance.") from None


#: how often one shard is retried on a fresh actor after the actor running it died
SHARD_RETRIES = 2

#: with this set (Ray reads it when imported, in every process it starts), a node whose IP is
#: 127.0.0.1 stays on loopback: Ray >= 2.50 otherwise replaces 127.0.0.1 by the host's external IP
#: (``services.resolve_ip_for_localhost``) and its servers listen there
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: the environment of a Ray instance this tool starts itself: on loopback only (`LOOPBACK_ENV`), and
#: its workers at normal priority. Ray starts workers at nice 15 by default, so on a machine where
#: anything else runs (a second analysis, a CI job) the actors doing the analysis starve: an actor
#: load that takes 4 s took over 4 minutes beside `stress-ng --cpu 2`.
LOCAL_RAY_ENV = {**LOOPBACK_ENV, "RAY_worker_niceness": "0"}


def bind_ray_to_loopback() -> dict[str, str | None]:
    """Make the Ray instance this process starts next listen on 127.0.0.1 only (GCS, raylet, Ray
    Client server, agents: see `LOOPBACK_ENV`); returns the previous environment values for
    `restore_env`. Only for an instance this process owns: a driver of a multi-node cluster must
    keep its reachable IP."""
    import sys

    previous = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    os.environ.update(LOCAL_RAY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported already: its constant was read from the environment then
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    import sys

    for k, v in previous.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in previous:
        value = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        constants.ENABLE_RAY_CLUSTER = (value.lower() in ("1", "true") if value else  # type: ignore[attr-defined]
                                        not constants.IS_WINDOWS_OR_OSX)


def start_local_ray(cpus: int, temp_dir: str | None = None) -> dict[str, str | None]:
    """``ray.init`` of a new local instance with `cpus` CPUs, no dashboard, listening on 127.0.0.1
    only (`bind_ray_to_loopback`); returns the environment to restore after ``ray.shutdown``."""
    import ray

    previous = bind_ray_to_loopback()
    extra: dict[str, Any] = {"_temp_dir": temp_dir} if temp_dir else {}
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False, **extra)
    except BaseException:
        restore_env(previous)
        raise
    return previous


def stop_local_ray() -> bool:
    """``ray.shutdown`` of the local instance this process started, its autoscaler monitor killed
    first. Ray stops its services one after another and gives each up to 1 s to exit on SIGTERM;
    the monitor's SIGTERM handler reports its end to the GCS, which Ray has stopped by then, so it
    never exits in time and every analysis waited a further second (Ray 2.60: 1.3 s of shutdown, of
    which 1.0 s on the monitor). A single local node has nothing to autoscale, so SIGKILL loses
    nothing. The monitor is reached through Ray's node object, which is private; if that fails, the
    shutdown is Ray's own. Returns whether the monitor was stopped first."""
    import ray

    first = False
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        if node is not None and node.is_head():
            node._kill_process_type(ray_constants.PROCESS_TYPE_MONITOR, allow_graceful=False, check_alive=False)
            first = True
    except Exception as e:  # noqa: BLE001 - the plain shutdown below still stops everything
        log.debug("could not stop Ray's monitor first (%s: %s)", type(e).__name__, e)
    ray.shutdown()
    return first


def _worker_class(exec_opts: ExecutionOptions) -> Any:
    """`ShardWorker` as a Ray actor class with the resources of one worker (no restarts: a dead
    actor's shard is retried on a new actor by `run_ray`)."""
    import ray

    return ray.remote(ShardWorker).options(num_cpus=exec_opts.cpus_per_worker, num_gpus=exec_opts.gpus_per_worker,
                                           max_restarts=0, max_task_retries=0)


class LocalRayStart:
    """A local Ray instance (`start_local_ray`) started in a background thread, so that its start
    (GCS, raylet and worker processes: about 3 s) and its actors' creation (their imports, see
    `ShardWorker`) overlap the driver's own loading of model, SAE and corpus. Hand-written: Ray
    offers no asynchronous ``init``.

    The thread lives until `release`, after ``ray.shutdown``: Ray's servers are started with a
    parent-death signal, which Linux sends when the *thread* that started them ends. Ray sets no
    SIGTERM handler from a thread; the CLI's own handling applies."""

    def __init__(self, exec_opts: ExecutionOptions) -> None:
        self.exec_opts = exec_opts
        self.cpus = max(math.ceil(exec_opts.workers * exec_opts.cpus_per_worker), 1)
        self.env: dict[str, str | None] | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        #: bare actors (`ShardWorker`), created as soon as Ray is up; `run_ray` loads them
        self.actors: list[Any] = []
        self._ready = threading.Event()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._start, name="ray-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        t0 = time.perf_counter()
        try:
            self.env = start_local_ray(self.cpus)
            worker = _worker_class(self.exec_opts)
            self.actors = [worker.remote(self.exec_opts.cpus_per_worker) for _ in range(self.exec_opts.workers)]
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by `wait`
            self.error = e
        self.seconds = time.perf_counter() - t0
        self._ready.set()
        self._released.wait()  # keep Ray's servers alive (see the class docstring)

    def wait(self) -> dict[str, str | None]:
        """Block until Ray is up; the environment to restore after ``ray.shutdown`` (or its error)."""
        self._ready.wait()
        if self.error is not None:
            if self.env is not None:  # up, but its actors could not be created
                stop_local_ray()
                restore_env(self.env)
                self.env = None
            self.release()
            raise self.error
        assert self.env is not None
        return self.env

    def release(self) -> None:
        """Let the thread end (after ``ray.shutdown``)."""
        self._released.set()
        self._thread.join(timeout=30)

    def cancel(self) -> None:
        """Stop the instance (once its start finished) when no pass used it."""
        self._ready.wait()
        if self.env is not None:
            stop_local_ray()
            restore_env(self.env)
            self.env = None
        self.release()


_prestarted: LocalRayStart | None = None


class _NoThreadSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def prestart_local_ray(exec_opts: ExecutionOptions) -> None:
    """Start the local Ray instance ``--executor ray`` without ``--ray-address`` will need, in the
    background (`LocalRayStart`), before the driver loads its inputs; `run_ray` takes it over.
    Call `cancel_prestart` in a ``finally`` (a no-op once `run_ray` has it)."""
    global _prestarted
    if exec_opts.executor != "ray" or exec_opts.ray_address or _prestarted is not None:
        return
    import ray

    if ray.is_initialized():
        return
    ray_logger = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _NoThreadSigtermWarning) for f in ray_logger.filters):
        ray_logger.addFilter(_NoThreadSigtermWarning())
    _prestarted = LocalRayStart(exec_opts)


def cancel_prestart() -> None:
    """Stop a prestarted local instance that no pass took over (the inputs were refused, or Ctrl-C)."""
    global _prestarted
    start, _prestarted = _prestarted, None
    if start is not None:
        start.cancel()


@contextlib.contextmanager
def local_ray_prestarted(exec_opts: ExecutionOptions) -> Iterator[None]:
    """`prestart_local_ray` on entry, `cancel_prestart` on exit: for a command's whole body, so that
    Ray's start overlaps the driver's imports (torch, TransformerLens) as well as its loading."""
    prestart_local_ray(exec_opts)
    try:
        yield
    finally:
        cancel_prestart()


def _close_actors(actors: list[Any], busy: set[Any], timeout_s: float = 10.0) -> None:
    """Let each idle actor remove its temporary directory (`ShardWorker.close`, up to ``timeout_s``
    in all), then kill every actor. An actor still running a shard (``busy``: the pass failed or was
    interrupted) is killed at once, as is one that died or does not answer."""
    import ray

    pending = []
    for a in actors:
        if a in busy:
            continue
        try:
            pending.append(a.close.remote())
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    if pending:
        ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def run_ray(inputs: Inputs, kind: str, opts: FullOptions | None, exec_opts: ExecutionOptions, ck: Checkpoint,
            factory: CollectorFactory, bar: Any, observer: PassObserver | None) -> ShardedPass:
    """Run the unfinished shards of ``ck`` on ``exec_opts.workers`` Ray actors; record each in the
    checkpoint as it arrives (any order); merge all in shard order. A local instance (no
    --ray-address) listens on 127.0.0.1 only. An actor that dies mid-shard (killed, out of memory,
    node lost) is replaced and its shard runs again on the new actor, up to `SHARD_RETRIES` times
    per shard (then the error is raised; the finished shards stay in the checkpoint)."""
    import ray

    from sae_mlops.analyses.sharding import finish_pass
    from sae_mlops.core.engine import PassStats

    global _prestarted
    owned = False
    previous_env: dict[str, str | None] | None = None
    ray_start = 0.0
    start, _prestarted = _prestarted, None
    if start is not None:  # started while the driver loaded (prestart_local_ray): wait for the rest
        t0 = time.perf_counter()
        previous_env = start.wait()
        owned = True
        ray_start = time.perf_counter() - t0
        log.info("Ray started in %.1f s, %.1f s of it while the inputs loaded", start.seconds,
                 max(start.seconds - ray_start, 0.0))
    elif not ray.is_initialized():
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if exec_opts.ray_address:
            check_reachable(exec_opts.ray_address)
            try:
                ray.init(address=exec_opts.ray_address, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported as a user error
                raise InputError(f"cannot connect to the Ray cluster at {exec_opts.ray_address} ({type(e).__name__}: "
                                 f"{str(e)[:200]}); start one with `ray start --head` or leave --ray-address out.") from e
        else:
            previous_env = start_local_ray(max(math.ceil(exec_opts.workers * exec_opts.cpus_per_worker), 1))
            owned = True
        ray_start = time.perf_counter() - t0
        log.info("Ray %s in %.1f s", "started" if owned else f"connected to {exec_opts.ray_address}", ray_start)
    actors: list[Any] = list(start.actors) if start is not None else []
    running: dict[Any, tuple[Any, ShardSpec]] = {}
    try:
        cfg, sae_files = _actor_config(inputs)
        corpus_ref = ray.put(inputs.corpus)
        sae_ref = ray.put(sae_files) if sae_files is not None else None
        worker = _worker_class(exec_opts)

        def load(actor: Any) -> Any:
            return actor.load.remote(cfg, kind, opts, corpus_ref, sae_ref)

        def new_actor() -> Any:
            actor = worker.remote(exec_opts.cpus_per_worker)
            actors.append(actor)
            load(actor)  # an actor runs its calls in order: a shard sent next waits for the load
            return actor

        todo = [s for s in ck.plan if s.index not in ck.done]
        n = max(1, min(exec_opts.workers, len(todo)))
        t_actors = time.perf_counter()
        idle = actors[:n]  # created while the inputs loaded (a prestarted local instance)
        for extra in actors[n:]:  # fewer shards left than workers
            ray.kill(extra)
        del actors[n:]
        while len(idle) < n:
            actor = worker.remote(exec_opts.cpus_per_worker)
            actors.append(actor)
            idle.append(actor)
        ray.get([load(a) for a in idle])  # start-up apart from the shards' wall time
        if start is not None:
            log.info("Ray: %d of the %d actors created while the inputs loaded run the shards; they loaded model "
                     "and SAE in %.1f s", n, len(start.actors), time.perf_counter() - t_actors)
        t_shards = time.perf_counter()
        total = sum(s.tokens for s in ck.plan)
        done_tokens = ck.tokens_done
        by_index = {s.index: s for s in ck.plan}
        peak = 0.0
        queue = list(todo)
        retries: dict[int, int] = {}
        while queue or running:
            while queue and idle:
                actor, spec = idle.pop(), queue.pop(0)
                running[actor.run.remote(spec, ck.blocks)] = (actor, spec)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, spec = running.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                retries[spec.index] = retries.get(spec.index, 0) + 1
                if retries[spec.index] > SHARD_RETRIES:
                    raise
                log.warning("the Ray actor running shard %d died (%s); running the shard again on a new actor "
                            "(retry %d of %d)", spec.index, type(e).__name__, retries[spec.index], SHARD_RETRIES)
                queue.insert(0, spec)
                idle.append(new_actor())
                continue
            idle.append(actor)
            index = int(res["index"])
            staging = ck.staging_dir(index)
            _write_tree(staging, res["files"])
            ck.commit(index, staging, PassStats(**res["stats"]))
            peak = max(peak, float(res["peak_rss_mib"]))
            done_tokens += by_index[index].tokens
            if bar is not None:
                bar.update(by_index[index].tokens)
            if observer is not None:
                observer.progress(done_tokens, total)
        shards_wall = time.perf_counter() - t_shards
        out = finish_pass(ck, factory, {})
        out.shards_resumed = len(ck.plan) - len(todo)
        out.extra["ray_start_s"] = ray_start
        out.extra["ray_actor_startup_s"] = t_shards - t_actors
        out.extra["ray_shards_wall_s"] = shards_wall
        out.extra["worker_peak_rss_mib"] = peak
        out.extra["workers"] = n
        out.extra["shard_retries"] = sum(retries.values())
        return out
    finally:
        _close_actors(actors, {actor for actor, _spec in running.values()})
        if owned:
            stop_local_ray()
        if previous_env is not None:
            restore_env(previous_env)
        if start is not None:
            start.release()
