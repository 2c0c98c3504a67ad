"""Co-occurrence counting: the sparse method against the density-chosen one (dense GEMM where the
codes are dense). Prints JSON; asserts nothing.

    python scripts/benchmark_cooccurrence.py                      # d_sae 512 and 4096, L0 16..400
    python scripts/benchmark_cooccurrence.py --d-sae 4096 --l0 64,200 --rows 16384 --repeats 5

Per (d_sae, L0): random codes of ``--rows`` tokens with L0 non-zeros per row on average (each
feature fires with probability L0 / d_sae), fed in batches of ``--batch`` rows to a
``CooccurrenceCollector`` with ``method="sparse"`` (the method before density was considered) and
with ``method="dense"`` and with the default (by density), ``--repeats`` times interleaved in one
process; reports the median seconds of update + sync of each, ``sparse_over_dense`` (where the
crossover lies) and ``sparse_over_auto`` (the speed-up), and checks the counts are identical. Ratios within one process are what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import _process_env  # noqa: F401, I001 - first: numpy reads NUMPY_MADVISE_HUGEPAGE when imported
import numpy as np
import torch

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.cooccurrence import CooccurrenceCollector


def _run(f: torch.Tensor, d: int, batch: int, method: str | None) -> tuple[float, CooccurrenceCollector]:
    steps = [StepData(batch=None, x=t, f=t, x_hat=t) for t in f.split(batch)]
    for s in steps:
        s.sparse  # noqa: B018 - the engine finds the non-zeros once per batch, outside the collector
    c = CooccurrenceCollector(d, method=method)
    t0 = time.perf_counter()
    for s in steps:
        c.update(s)
    c.sync()
    return time.perf_counter() - t0, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-sae", default="512,4096")
    ap.add_argument("--l0", default="16,64,128,200,400")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2032, help="rows per batch (16 windows of 127 tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for d in map(int, args.d_sae.split(",")):
        for l0 in map(int, args.l0.split(",")):
            if l0 >= d:
                continue
            g = torch.Generator().manual_seed(0)
            f = torch.rand(args.rows, d, generator=g)
            f = torch.where(f < l0 / d, f + 0.1, torch.zeros(()))
            times: dict[str, list[float]] = {"sparse": [], "dense": [], "auto": []}
            for _ in range(args.repeats):
                ts, cs = _run(f, d, args.batch, "sparse")
                td, cd = _run(f, d, args.batch, "dense")
                ta, ca = _run(f, d, args.batch, None)
                times["sparse"].append(ts)
                times["dense"].append(td)
                times["auto"].append(ta)
            for c in (cd, ca):
                assert np.array_equal(cs.counts, c.counts) and np.array_equal(cs.fire, c.fire)
            med = {k: statistics.median(v) for k, v in times.items()}
            out.append({"d_sae": d, "l0": l0, "density": l0 / d, "rows": args.rows,
                        "auto_method": "dense" if ca.batches_dense else "sparse",
                        "sparse_s": med["sparse"], "dense_s": med["dense"], "auto_s": med["auto"],
                        "sparse_over_dense": med["sparse"] / med["dense"],
                        "sparse_over_auto": med["sparse"] / med["auto"], "counts_identical": True})
            print(json.dumps(out[-1]), flush=True)


if __name__ == "__main__":
    main()
