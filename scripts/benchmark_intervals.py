"""Benchmark: what the intervals cost. Prints JSON per cell; asserts nothing.

    python scripts/benchmark_intervals.py --cells demo:topk:16:512,wide:topk:64:4096,wide:standard:200:4096,wide:topk:256:65536 --tokens 20000

A cell is ``model:kind:l0:d_sae`` as in ``scripts/benchmark_grid.py`` (``demo`` model or the random
``wide`` one; a random SAELens TopK or standard SAE). Per cell, one quick pass (sparsity,
reconstruction, downstream and the per-block statistics) in this process, measured in wall and
process-CPU seconds (CPU time is steadier on a shared machine):

- ``pass_s``: the pass; ``blocks_s``: the per-block statistics collector's part of it;
- ``intervals_s``: the bootstrap after the pass (2000 resamples of every metric);
- ``share``: (blocks + intervals) / pass, the target being <= 2 %;
- ``blocks_bytes``: ``results/blocks.safetensors`` (the artifact a comparison pairs), ``n_blocks``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _process_env  # noqa: F401, I001 - first: numpy reads NUMPY_MADVISE_HUGEPAGE when imported
import torch
from benchmark_grid import cell_inputs  # scripts/ is on sys.path when run as a script


def cell(model_kind: str, kind: str, l0: int, d_sae: int, tokens: int) -> dict:
    from sae_mlops.analyses.quick import assemble_result, run_sharded_pass
    from sae_mlops.outputs.summaries import write_block_sums

    _cfg, inputs, _batches = cell_inputs(model_kind, kind, l0, d_sae, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        sharded = run_sharded_pass(inputs, "quick", Path(tmp))
        result = assemble_result("quick", inputs, sharded.stats, sharded.collectors)
        files = write_block_sums(result, Path(tmp))
        blocks_bytes = sum(p.stat().st_size for p in files)
    m, st = result.metrics, sharded.stats
    pass_s, pass_cpu = st.seconds, st.cpu_seconds
    blocks_s, blocks_cpu = st.part_seconds.get("blocks", 0.0), st.part_cpu_seconds.get("blocks", 0.0)
    return {"model": model_kind, "kind": kind, "l0_target": l0, "d_sae": d_sae, "tokens": m["tokens/analysed"],
            "l0": m["sparsity/l0_mean"], "pass_s": pass_s, "blocks_s": blocks_s, "intervals_s": m["time/intervals"],
            "share": (blocks_s + m["time/intervals"]) / pass_s, "pass_cpu_s": pass_cpu, "blocks_cpu_s": blocks_cpu,
            "share_cpu_pass_part": blocks_cpu / pass_cpu, "n_blocks": int(m["stats/blocks"]),
            "blocks_bytes": blocks_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="demo:topk:16:512,wide:topk:64:4096")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.cells.split(","):
        model_kind, kind, l0, d_sae = spec.split(":")
        t0 = time.perf_counter()
        row = cell(model_kind, kind, int(l0), int(d_sae), args.tokens)
        row["cell_wall_s"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
