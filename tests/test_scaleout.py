"""Sharded, resumable analysis on one process and on a real Ray cluster (no mocks).

The reference is one unsharded pass (a single shard). Every other way of running the same analysis
must give the same result: integer counts, examples and feature summaries identical, float metrics
within 1e-9 relative, the activation database identical row for row (compared with DuckDB).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from sae_mlops.config import AnalysisConfig, ExecutionOptions, FullOptions
from sae_mlops.demo import demo_sae_path
from sae_mlops.errors import InputError
from sae_mlops.workflows import run_full_and_log, run_quick_and_log

SAE = str(demo_sae_path("batchtopk"))  # batch-global BatchTopK: shards must be whole batches
TOKENS, BATCH = 12_000, 2
SHARD = 3_000  # analysed tokens per shard: 4 shards, most starting inside a pool (64 windows, ~8k tokens)
CLI = [sys.executable, "-m", "sae_mlops.cli"]
NOISE = ("time/", "time_cpu/", "speed/", "memory/", "artifacts/", "progress/")


def _cfg(**kw) -> AnalysisConfig:
    return AnalysisConfig(sae=SAE, model="demo", max_tokens=TOKENS, batch_size=BATCH, progress=False, **kw)


def _full(out: Path, **exec_kw):
    return run_full_and_log(_cfg(), out, opts=FullOptions(), track=False, exec_opts=ExecutionOptions(**exec_kw))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "full"
    outcome = _full(out, shard_tokens=10**9)
    assert outcome.result.params["shards"] == 1
    return out


def _results(out: Path) -> dict:
    return json.loads((out / "results" / "analysis_results.json").read_text())


#: float sums of another process (a Ray actor on 1 thread, a resumed process) may differ in the last
#: float32 bits of the model's GEMMs: CE with the hook zero-ablated (a sum over 32k-vocabulary logits,
#: computed in 256-row chunks) was seen 3e-9 apart; integer counts must be identical
FLOAT_REL = 1e-7
#: per-block sums of float32 per-token values (a block holds ~100 tokens, not ~10^4): float32 precision
BLOCK_REL = 1e-5


def assert_same_analysis(got: Path, want: Path, full: bool = True) -> None:
    a, b = _results(got), _results(want)
    keys = {k for k in b["metrics"] if not k.startswith(NOISE)}
    assert keys and keys <= set(a["metrics"])
    for k in sorted(keys):
        x, y = a["metrics"][k], b["metrics"][k]
        if isinstance(y, int) and not isinstance(y, bool):
            assert x == y, k
        elif not (isinstance(y, float) and math.isnan(y)):
            assert x == pytest.approx(y, rel=FLOAT_REL, abs=1e-12), k
    import pandas as pd

    # the intervals: present, and from identical per-block sums (so sharded, resumed and Ray runs give
    # the same intervals as one local pass; the bounds are among the metrics compared above)
    assert any(k.endswith("_ci_low") for k in keys) and "downstream/loss_recovered_ci_high" in keys
    from sae_mlops.core.intervals import BlockSums

    ba, bb = BlockSums.load(got / "results"), BlockSums.load(want / "results")
    assert ba.plan == bb.plan and set(ba.arrays) == set(bb.arrays)
    for name, arr in bb.arrays.items():
        if arr.dtype.kind in "iu":
            assert np.array_equal(ba.arrays[name], arr), name
        else:
            assert np.allclose(ba.arrays[name], arr, rtol=BLOCK_REL, atol=1e-9), name
    fa, fb = pd.read_parquet(got / "results/feature_stats.parquet"), pd.read_parquet(want / "results/feature_stats.parquet")
    assert fa["firing_count"].tolist() == fb["firing_count"].tolist()
    assert np.allclose(fa["mean_activation"], fb["mean_activation"], rtol=1e-9, atol=0)
    if not full:
        return
    assert (got / "results/feature_summaries.jsonl").read_text() == (want / "results/feature_summaries.jsonl").read_text()
    assert np.array_equal(np.load(got / "matrices/feature_cooccurrence.npy"), np.load(want / "matrices/feature_cooccurrence.npy"))
    for table, order in (("activations", "token_index, feature"), ("tokens", "token_index")):
        q = f"select * from read_parquet('{{}}/activation_database/activation_db/{table}/*.parquet') order by {order}"
        x, y = duckdb.sql(q.format(got)).df(), duckdb.sql(q.format(want)).df()
        assert len(x) > 0 and x.equals(y), table
    assert not (got / "checkpoint").exists()  # removed once the outputs are written


def test_sharded_local_pass_equals_one_shard(reference, tmp_path):
    outcome = _full(tmp_path / "sharded", shard_tokens=SHARD)
    assert outcome.result.params["shards"] >= 3
    assert outcome.result.metrics["time/pass/checkpoint"] > 0
    assert_same_analysis(tmp_path / "sharded", reference)


# -- a real Ray cluster on loopback -------------------------------------------------------------


def _free_port() -> int:
    from mlflow_servers import free_port

    return free_port()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head (`ray start --head --block`) on 127.0.0.1 with 2 CPUs, in its own process group,
    stopped (the whole group) at the end; yields its address. Ray's token authentication is off for
    this loopback-only cluster (RAY_AUTH_MODE=disabled), so other Ray users of the machine, which may
    rotate ~/.ray/auth_token, cannot lock the test out."""
    import ray

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_worker_niceness": "0"},  # Ray nices workers to 15: they starve on a loaded machine
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        assert ray.cluster_resources().get("CPU") == 2
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the head's process group is left
        except ProcessLookupError:
            pass
        proc.wait(10)
        mp.undo()


@pytest.mark.parametrize("workers", [1, 2])
def test_full_on_ray_equals_the_local_pass(reference, ray_cluster, tmp_path, workers):
    out = tmp_path / f"ray{workers}"
    outcome = _full(out, shard_tokens=SHARD, executor="ray", workers=workers, ray_address=ray_cluster)
    assert outcome.result.params["executor"] == "ray"
    assert outcome.result.params["workers"] == workers
    assert outcome.result.metrics["memory/worker_peak_rss_mib"] > 0
    assert_same_analysis(out, reference)


def test_quick_on_ray_equals_quick_local(ray_cluster, tmp_path):
    local = run_quick_and_log(_cfg(), tmp_path / "local", track=False, exec_opts=ExecutionOptions(shard_tokens=10**9))
    ray_run = run_quick_and_log(_cfg(), tmp_path / "ray", track=False,
                                exec_opts=ExecutionOptions(shard_tokens=SHARD, executor="ray", workers=2, ray_address=ray_cluster))
    assert ray_run.result.params["shards"] >= 3 and local.result.params["shards"] == 1
    assert_same_analysis(tmp_path / "ray", tmp_path / "local", full=False)
    assert not (tmp_path / "ray" / "checkpoint").exists()
    m = ray_run.result.metrics  # the fixed cost of Ray, in parts: connecting (the cluster is up), the actors
    assert m["time/ray_start"] >= 0 and m["time/ray_actor_startup"] > 0 and m["time/ray_shards"] > 0
    assert m["time/ray_start"] + m["time/ray_actor_startup"] + m["time/ray_shards"] <= m["time/pass"] * 1.01 + 0.01


def test_ray_address_that_answers_nothing_is_a_user_error(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(InputError, match="cannot connect to the Ray cluster"):
        _full(tmp_path / "x", executor="ray", ray_address=f"127.0.0.1:{_free_port()}")


# -- kill, then resume --------------------------------------------------------------------------


def _cli_full(out: Path, *extra: str, env=None) -> list[str]:
    return [*CLI, "full", "--sae", SAE, "--model", "demo", "--max-tokens", str(TOKENS), "--batch-size", str(BATCH),
            "--shard-tokens", str(SHARD), "--out", str(out), "-q", *extra]


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / "checkpoint" / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _kill_after_first_shard(cmd: list[str], out: Path, env: dict) -> dict:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while not _manifest(out).get("done"):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    manifest = _manifest(out)
    assert 0 < len(manifest["done"]) < len(manifest["plan"])
    return manifest


@pytest.fixture()
def tracked_env(tmp_path):
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["MLFLOW_EXPERIMENT_NAME"] = "scaleout"
    return env


def test_sigkill_mid_pass_then_resume_equals_uninterrupted(reference, tmp_path, tracked_env):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "killed"
    manifest = _kill_after_first_shard(_cli_full(out), out, tracked_env)
    run_id = manifest["mlflow_run_id"]
    client = MlflowClient(tracked_env["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # killed hard: nobody could mark it, the resumed analysis takes it over
    # logged when the pass started (0) and after each shard; the kill may fall between a shard's
    # manifest entry and its progress metric, so only its presence is certain here
    assert "progress/tokens_done" in run.data.metrics
    assert run.info.run_name.startswith("full · ")
    note = run.data.tags["mlflow.note.content"]  # the description says it runs and how to resume
    assert note.startswith("**running**") and f"--resume {out}" in note

    # a changed pass option is refused with one sentence naming it, and nothing is lost
    bad = subprocess.run(_cli_full(out, "--context-size", "64"), env=tracked_env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert "context_size was" in bad.stderr and "64" in bad.stderr
    assert _manifest(out)["done"] == manifest["done"]

    done = subprocess.run(_cli_full(out), env=tracked_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_analysis(out, reference)
    results = _results(out)
    assert results["params"]["shards_resumed"] == len(manifest["done"])
    run = client.get_run(run_id)  # the same run, finished by the resumed analysis
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("sae_mlops.resumed") == "true"
    assert run.data.tags["mlflow.note.content"].startswith("**full analysis**")  # the running note is replaced
    assert run.data.metrics["progress/fraction"] == 1.0
    assert run.data.params["shards"] == str(len(manifest["plan"]))


def test_resume_option_needs_an_unfinished_analysis(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no unfinished analysis"):
        run_quick_and_log(_cfg(), track=False, resume=tmp_path / "empty")
    with pytest.raises(InputError, match="give only one of them"):
        run_quick_and_log(_cfg(), tmp_path / "a", track=False, resume=tmp_path / "b")


def test_resume_option_continues_a_quick_analysis(tmp_path, tracked_env):
    out = tmp_path / "q"
    cmd = [*CLI, "quick", "--sae", SAE, "--model", "demo", "--max-tokens", str(TOKENS), "--batch-size", str(BATCH),
           "--shard-tokens", str(SHARD), "--out", str(out), "-q"]
    manifest = _kill_after_first_shard(cmd, out, tracked_env)
    cont = subprocess.run([*CLI, "quick", "--sae", SAE, "--model", "demo", "--max-tokens", str(TOKENS), "--batch-size",
                           str(BATCH), "--shard-tokens", str(SHARD), "--resume", str(out), "-q"],
                          env=tracked_env, capture_output=True, text=True, timeout=300)
    assert cont.returncode == 0, cont.stderr[-3000:]
    res = _results(out)
    assert res["params"]["shards_resumed"] == len(manifest["done"])
    assert res["metrics"]["tokens/analysed"] == TOKENS
    assert not (out / "checkpoint").exists()


def test_tracking_server_lost_mid_pass_the_analysis_finishes_and_says_how_to_log(tmp_path):
    """The MLflow server goes away after the first shard: the pass goes on (one warning, no minutes of
    retries per shard), the outputs are complete, and the one error line says how to log them later."""
    from mlflow_servers import mlflow_server

    out = tmp_path / "lost"
    with mlflow_server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path) as uri:
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="lost")
        proc = subprocess.Popen(_cli_full(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 180
        while not _manifest(out).get("done"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, stderr[-3000:]
    assert "MLflow did not take the running analysis's progress" in stderr
    assert f"sae-mlops log {out}" in stderr
    assert (out / "SUMMARY.json").is_file() and not (out / "checkpoint").exists()


def test_failure_after_the_pass_keeps_the_checkpoint_and_the_resume_is_complete(reference, tmp_path, monkeypatch):
    """An error after the database was assembled (here: writing the feature summaries) leaves the
    checkpoint with every shard's database parts (they are linked into the database, not moved), so
    the same command afterwards gives the complete analysis."""
    import sae_mlops.outputs.full_reports as writers

    def boom(*args, **kwargs):
        raise OSError("no space left on device")

    out = tmp_path / "failed"
    with monkeypatch.context() as m:
        m.setattr(writers, "write_feature_summaries", boom)
        with pytest.raises(OSError, match="no space"):
            _full(out, shard_tokens=SHARD)
    assert (out / "activation_database" / "activation_db").is_dir()
    done = _manifest(out)["done"]
    assert done and all((out / "checkpoint" / f"shard-{int(i):05d}" / "db" / "activations").glob("*.parquet") for i in done)
    outcome = _full(out, shard_tokens=SHARD)
    assert outcome.result.params["shards_resumed"] == len(done)
    assert_same_analysis(out, reference)
