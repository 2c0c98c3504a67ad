"""Sharding overhead of the local executor: the sharded pass against the unsharded one, in one
process, interleaved. Prints JSON; asserts nothing.

    python scripts/benchmark_shards.py                                    # 24k tokens, 3/10/30 shards
    python scripts/benchmark_shards.py --tokens 480000 --shards 3,10,30   # shards of >= 16k tokens

The demo model and BatchTopK SAE, the quick analysis's collectors, ``--batch-size`` windows per
batch. Per round, the unsharded pass (one shard) and the pass cut into each of ``--shards`` shard
counts (``--shard-tokens`` = tokens / shards) run one after another (``--repeats`` rounds); the
median over rounds of process CPU seconds (all threads; less disturbed by other work on a shared
machine than wall time) of the plan and the pass, and of the pass's ``model`` part, is reported
with ``*_over_unsharded`` ratios. ``--retokenize`` adds runs whose shards tokenize their documents
again instead of taking the planned ids (what a resumed or Ray shard does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _process_env  # noqa: F401, I001 - first: numpy reads NUMPY_MADVISE_HUGEPAGE when imported
import torch


def one(inputs, shard_tokens: int, retokenize: bool) -> dict:
    import sae_mlops.analyses.sharding as sharding
    from sae_mlops.analyses.quick import run_sharded_pass
    from sae_mlops.config import ExecutionOptions
    from sae_mlops.core.tokens import PoolCache

    class NoCache(PoolCache):
        def add(self, pool) -> None:  # keeps nothing: every shard tokenizes again
            return None

    sharding.PoolCache = NoCache if retokenize else PoolCache  # type: ignore[misc]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            w0, c0 = time.perf_counter(), time.process_time()
            r = run_sharded_pass(inputs, "quick", Path(tmp), ExecutionOptions(shard_tokens=shard_tokens))
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        sharding.PoolCache = PoolCache  # type: ignore[misc]
    return {"shards": r.shards, "cpu_s": cpu, "wall_s": wall, "model_cpu_s": r.stats.part_cpu_seconds["model"],
            "batches_cpu_s": r.stats.part_cpu_seconds["batches"], "tokens": r.stats.tokens_analysed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=24_000)
    ap.add_argument("--shards", default="3,10,30")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retokenize", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sae_mlops.analyses.quick import prepare
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path

    cfg = AnalysisConfig(sae=str(demo_sae_path("batchtopk")), model="demo", max_tokens=args.tokens, progress=False,
                         device="cpu", batch_size=args.batch_size)
    inputs = prepare(cfg)
    variants = [("unsharded", 10**12, False)]
    for n in map(int, args.shards.split(",")):
        variants.append((f"shards_{n}", -(-args.tokens // n), False))
        if args.retokenize:
            variants.append((f"shards_{n}_retokenize", -(-args.tokens // n), True))
    one(inputs, 10**12, False)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for _ in range(args.repeats):
        for name, st, retok in variants:
            runs[name].append(one(inputs, st, retok))
    report: dict = {"config": vars(args)}
    base = {k: statistics.median(r[k] for r in runs["unsharded"]) for k in ("cpu_s", "model_cpu_s", "wall_s")}
    for name, _, _ in variants:
        med = {k: statistics.median(r[k] for r in runs[name]) for k in ("cpu_s", "model_cpu_s", "batches_cpu_s", "wall_s")}
        med["shards"] = runs[name][0]["shards"]
        med["cpu_over_unsharded"] = med["cpu_s"] / base["cpu_s"]
        med["model_cpu_over_unsharded"] = med["model_cpu_s"] / base["model_cpu_s"]
        med["wall_over_unsharded"] = med["wall_s"] / base["wall_s"]
        report[name] = med
        print(json.dumps({name: med}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
