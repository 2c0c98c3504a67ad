"""Cold vs warm job latency of the service's executors. Prints figures (JSON); asserts nothing.

    python scripts/benchmark_service_ray.py [--tokens 2000] [--warm-jobs 3]

The demo SAELens SAE is registered as versions of a model in a sqlite tracking store (no server),
and quick analyses of ``models:/<name>/<version>`` run exactly as the service runs them:

- ``local``: ``python -m sae_mlops.service.job spec.json``, a new process per job (executor local);
- ``ray_cold``: a new Ray actor (executor ray) and its first job: interpreter, imports, model load;
- ``ray_warm``: further jobs on the same actor (imports done, base model cached).

Per job: ``wall_s`` (submitting the job to having its result, as the worker sees it), ``pass_s``
(``time/pass``: the streaming pass), ``overhead_s`` = wall - pass (what the job costs beyond its
pass: start-up, imports, loading, MLflow run handling, logging), and ``first_batch_s`` (time to
the first batch: wall - (time/total - time/startup) + time/import + time/load, i.e. everything
before ``run_quick_and_log`` starts plus its imports and loading). The Ray instance is the one
the service would own (``ray_address`` unset: ``ray start --head`` on loopback, ``ray_init_s``;
1 actor of 1 CPU), stopped by its watchdog when the script exits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _register(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    from sae_mlops.demo import demo_sae_path

    exp = client.get_experiment_by_name("sae-training")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment("sae-training")
    run = client.create_run(exp_id, run_name="train-demo-sae")
    model = client.create_logged_model(exp_id, name="sae", source_run_id=run.info.run_id, model_type="sae")
    client.log_model_artifacts(model.model_id, str(demo_sae_path("saelens")))
    client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run.info.run_id, "FINISHED")
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    return str(client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run.info.run_id,
                                           model_id=model.model_id).version)


def _spec(root: Path, uri: str, name: str, version: str, job_id: int, tokens: int) -> dict:
    job_dir = root / "jobs" / str(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    return {"job_id": job_id, "job_key": f"bench-{job_id}", "attempt": 1, "model_name": name, "version": version,
            "kind": "quick", "options": {"max_tokens": tokens, "batch_size": 8}, "trigger": "benchmark",
            "device": "cpu", "experiment": "benchmark-service-ray", "tracking_uri": uri,
            "out_dir": str(job_dir / "out"), "result_path": str(job_dir / "result.json"), "log_format": "json",
            "log_level": "INFO", "log_path": str(job_dir / "attempt-1.log"), "keep_outputs": False}


def _figures(wall: float, result: dict) -> dict:
    m = result["metrics"]
    run_s = m["time/total"] - m.get("time/startup", 0.0)
    return {"wall_s": round(wall, 3), "pass_s": round(m["time/pass"], 3), "overhead_s": round(wall - m["time/pass"], 3),
            "first_batch_s": round(wall - run_s + m.get("time/import", 0.0) + m.get("time/load", 0.0), 3),
            "import_s": round(m.get("time/import", 0.0), 3), "load_s": round(m.get("time/load", 0.0), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--warm-jobs", type=int, default=3)
    ap.add_argument("--local-jobs", type=int, default=2)
    args = ap.parse_args()

    import os

    from mlflow.tracking import MlflowClient

    root = Path(tempfile.mkdtemp(prefix="bench-svc-ray-"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "sae-bench-ray"
    job_id = 0
    out: dict = {"tokens": args.tokens, "machine_cpus": os.cpu_count()}

    local = []
    for _ in range(args.local_jobs):
        job_id += 1
        spec = _spec(root, uri, name, _register(client, name), job_id, args.tokens)
        spec_path = Path(spec["result_path"]).with_name("spec.json")
        spec_path.write_text(json.dumps(spec))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "sae_mlops.service.job", str(spec_path)], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"job process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        local.append(_figures(wall, json.loads(Path(spec["result_path"]).read_text())))
    out["local"] = local

    import ray

    from sae_mlops.service.ray_executor import ActorSlot, RayRuntime
    from sae_mlops.service.settings import Settings

    settings = Settings(webhook_secret="x", tracking_uri=uri, executor="ray", ray_workers=1, ray_cpus_per_worker=1,
                        model_cache_size=2, log_format="json")
    runtime = RayRuntime(settings)
    t = time.perf_counter()
    runtime.connect()
    out["ray_init_s"] = round(time.perf_counter() - t, 3)
    slot = ActorSlot(runtime, "bench")
    try:
        runs = []
        for i in range(1 + args.warm_jobs):
            job_id += 1
            spec = _spec(root, uri, name, _register(client, name), job_id, args.tokens)
            t = time.perf_counter()
            if i == 0:
                info = slot.ensure()
                out["ray_actor_ready_s"] = round(time.perf_counter() - t, 3)
                out["ray_actor_imports_s"] = info["warm_seconds"]
            r = ray.get(slot.actor.run.remote(spec))
            wall = time.perf_counter() - t
            if r["rc"] != 0:
                raise SystemExit(f"actor job failed ({r['rc']}); see {spec['log_path']}")
            runs.append(_figures(wall, r["result"]))
        out["ray_cold"] = runs[0]
        out["ray_warm"] = runs[1:]
        out["model_cache"] = ray.get(slot.actor.info.remote())["model_cache"]
    finally:
        slot.kill()
        runtime.shutdown()
    warm = out["ray_warm"]
    out["summary"] = {
        "local_overhead_s": round(statistics.median(j["overhead_s"] for j in local), 3),
        "local_first_batch_s": round(statistics.median(j["first_batch_s"] for j in local), 3),
        "ray_cold_overhead_s": out["ray_cold"]["overhead_s"],
        "ray_cold_first_batch_s": out["ray_cold"]["first_batch_s"],
        "ray_warm_overhead_s": round(statistics.median(j["overhead_s"] for j in warm), 3) if warm else None,
        "ray_warm_first_batch_s": round(statistics.median(j["first_batch_s"] for j in warm), 3) if warm else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
