"""Benchmark the full analysis: speed against the necessary model compute, peak memory as the
corpus grows, and feature-summary time as d_sae grows. Prints figures (JSON); asserts nothing.

    python scripts/benchmark_full.py [--sae PATH] [--tokens 40000] [--sizes 20000,80000] [--d-sae 512,4096,16384]

- necessary: on the same batches, the model alone as ``scripts/_baseline.py`` counts it (one
  forward to the hook plus the clean and SAE-spliced continuations);
- full_pass: the single streaming pass with every full-analysis collector (tokenization, SAE,
  metrics, top-k examples, co-occurrence counts, activation database shards);
- full_pass_full_zero_ablation: the same pass with the zero-ablated continuation run in full for
  every batch instead of once as one row (``Engine.constant_zero_ablation = False``);
- full_total: run_full end to end (loading, pass, database finalisation, matrices, logit lens,
  summaries, plots, reports); everything after the pass depends on d_sae, not on the corpus, so
  its share shrinks as the corpus grows (``--tokens``).
Peak memory (max RSS) is measured in a fresh subprocess per corpus size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _process_env  # noqa: F401, I001 - first: numpy reads NUMPY_MADVISE_HUGEPAGE when imported
import torch
from _baseline import necessary_model_compute  # scripts/ is on sys.path when run as a script


def _cfg(sae: str, tokens: int):
    from sae_mlops.config import AnalysisConfig

    return AnalysisConfig(sae=sae, model="demo", max_tokens=tokens, progress=False)


def speed(sae: str, tokens: int, repeats: int = 3) -> dict:
    """Necessary compute and run_full, interleaved ``repeats`` times on a warm process; the best
    of each (timings on a shared 2-core machine vary by +-10% between runs)."""
    from sae_mlops.analyses.quick import make_batches, prepare
    from sae_mlops.core.engine import Engine
    from sae_mlops.analyses.full import run_full

    inputs = prepare(_cfg(sae, tokens))
    batches = list(make_batches(inputs, tokens))
    engine = Engine(inputs.model.model, inputs.sae.module, inputs.site, inputs.device)

    def necessary():
        necessary_model_compute(engine, batches, inputs.device)

    necessary()  # warm-up
    t_nec, t_pass, t_total, t_post = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        necessary()
        t_nec.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = run_full(_cfg(sae, tokens), Path(tmp))
            t_total.append(time.perf_counter() - t0)
        t_pass.append(out.result.metrics["speed/seconds"])
        t_post.append(t_total[-1] - t_pass[-1])
    # the same pass with the zero-ablated continuation run in full for every batch
    Engine.constant_zero_ablation = False
    try:
        t_full_zero = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t_full_zero.append(run_full(_cfg(sae, tokens), Path(tmp)).result.metrics["speed/seconds"])
    finally:
        Engine.constant_zero_ablation = True
    best = {"necessary": min(t_nec), "full_pass": min(t_pass), "full_total": min(t_total),
            "after_pass": min(t_post), "full_pass_full_zero_ablation": min(t_full_zero)}
    return {
        "tokens": tokens,
        "batches": len(batches),
        "repeats": repeats,
        "seconds_best": best,
        "seconds_all": {"necessary": t_nec, "full_pass": t_pass, "full_total": t_total},
        "ratios": {
            "full_pass_over_necessary": best["full_pass"] / best["necessary"],
            "full_total_over_necessary": best["full_total"] / best["necessary"],
            "full_pass_full_zero_ablation_over_necessary": best["full_pass_full_zero_ablation"] / best["necessary"],
        },
    }


def child_memory(sae: str, tokens: int) -> None:
    from sae_mlops.analyses.full import run_full
    from sae_mlops.telemetry import peak_rss_mib  # VmHWM: a child's ru_maxrss carries the parent's RSS

    with tempfile.TemporaryDirectory() as tmp:
        run_full(_cfg(sae, tokens), Path(tmp))
    print(json.dumps({"tokens": tokens, "max_rss_mib": peak_rss_mib()}))


def memory(sae: str, sizes: list[int]) -> list[dict]:
    out = []
    for n in sizes:
        res = subprocess.run([sys.executable, __file__, "--child-memory", str(n), "--sae", sae],
                             capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def summaries_vs_d_sae(d_values: list[int], tokens: int = 20_000, l0: int = 32, batch: int = 2048) -> list[dict]:
    """Top-k examples collection + JSONL writing on synthetic sparse codes, per d_sae."""
    from sae_mlops.core.collectors.base import StepData
    from sae_mlops.core.collectors.examples import TopExamplesCollector
    from sae_mlops.core.tokens import Window, WindowPlan, collate
    from sae_mlops.outputs.full_reports import write_feature_summaries

    plan = WindowPlan(128, True, 0, 0, [0])
    vocab = [f"t{i}" for i in range(1000)]
    results = []
    for d in d_values:
        g = torch.Generator().manual_seed(0)
        c = TopExamplesCollector(d)
        t_collect = 0.0
        start = 0
        while start < tokens:
            windows = [Window(i, 0, [0, *torch.randint(1, 1000, (127,), generator=g).tolist()], True) for i in range(batch // 127 + 1)]
            tb = collate(windows, plan)
            n = tb.n_analysed
            f = torch.zeros(n, d)
            idx = torch.randint(0, d, (n, l0), generator=g)
            f.scatter_(1, idx, torch.rand(n, l0, generator=g))
            t0 = time.perf_counter()
            c.update(StepData(batch=tb, x=f[:, :1], f=f, x_hat=f[:, :1], token_start=start))
            t_collect += time.perf_counter() - t0
            start += n
        count = (c.token >= 0).sum(1)
        pf = {"firing_count": count.tolist(), "frequency": (count / tokens).tolist(),
              "mean_activation": [0.5] * d, "max_activation": [1.0] * d}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_feature_summaries(Path(tmp) / "fs.jsonl", pf, c, vocab, None)
            t_write = time.perf_counter() - t0
        results.append({"d_sae": d, "tokens": start, "collect_s": t_collect, "write_s": t_write})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=None, help="SAE source (default: the demo BatchTopK SAE)")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed,memory,summaries")
    ap.add_argument("--sizes", default="100000,450000", help="corpus sizes (tokens) for the memory figure")
    ap.add_argument("--d-sae", default="512,4096,16384")
    ap.add_argument("--child-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sae is None:
        from sae_mlops.demo import demo_sae_path

        args.sae = str(demo_sae_path("batchtopk"))
    if args.child_memory:
        child_memory(args.sae, args.child_memory)
        return
    skip = set(filter(None, args.skip.split(",")))
    report = {"torch_threads": torch.get_num_threads()}
    if "speed" not in skip:
        report["speed"] = speed(args.sae, args.tokens, args.repeats)
    if "memory" not in skip:
        report["peak_memory"] = memory(args.sae, [int(s) for s in args.sizes.split(",")])
    if "summaries" not in skip:
        report["feature_summaries_vs_d_sae"] = summaries_vs_d_sae([int(d) for d in args.d_sae.split(",")])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
