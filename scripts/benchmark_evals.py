"""Time each eval on the demo and on the wide benchmark model, and the activation cache's saving when
five SAEs share a hook. Prints figures; asserts nothing.

    python scripts/benchmark_evals.py [--models demo,wide] [--per-class 150] [--saes 5] \\
        [--d-sae 4096] [--l0 64] [--autointerp-features 20] [--autointerp-tokens 5000] [--threads 1]

Models (as in scripts/benchmark_grid.py): ``demo``, the demo model (2 layers, d_model 64, vocab 2048);
``wide``, a randomly initialised HookedTransformer (4 layers, d_model 512, vocab 32768) run on the demo
tokenizer's ids. The hook is the demo SAEs' (``blocks.0.hook_resid_post``). The probing data are the
demo's built-in tasks (doctest, returns, five topics) with ``--per-class`` texts per class, written to
JSONL files and passed as ``--datasets`` would.

Per model:

1. **Each eval's time**, on one SAE (demo: the demo SAELens SAE; wide: a random TopK SAE with
   ``--d-sae`` latents and k = ``--l0``, `benchmark_grid.random_sae`): probing with a cold cache
   (its model seconds, i.e. the pass to the hook over every text, and the rest: pooling the codes and
   fitting the probes), probing again with the cache warm, first-letter absorption, and auto-interp
   (a full analysis over ``--autointerp-tokens`` tokens for its activation database, then labelling and
   detection scoring of the top ``--autointerp-features`` features against the local
   OpenAI-compatible stub of tests/openai_stub.py, so the LLM's own time is not in it).
2. **The cache's saving with ``--saes`` SAEs on one hook** (random TopK SAEs, seeds 0..n-1):
   probing every SAE with a cold cache (a fresh cache directory each, so the model runs for every SAE)
   against probing them in turn with one shared cache (the model runs for the first only), interleaved
   SAE by SAE so that a slow minute on a shared machine hits both. Wall and process-CPU seconds
   (``--threads 1``, the default, for torch, BLAS and OpenMP, keeps the CPU time honest) and their ratio.

The machine's load average is printed at the start and at the end: read the seconds with it, the
ratios (measured in this one process) less so.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


@dataclass
class Timed:
    wall: float
    cpu: float


def timed(fn) -> tuple[Timed, object]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return Timed(time.perf_counter() - t0, time.process_time() - c0), out


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} CPUs"


def demo_task_files(per_class: int, d: Path) -> str:
    """The demo tasks with `per_class` texts per class as JSONL files; the ``--datasets`` value naming them."""
    from sae_mlops.evals.datasets import demo_datasets

    d.mkdir(parents=True, exist_ok=True)
    specs = []
    for ds in demo_datasets(per_class=per_class):
        path = d / f"{ds.name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for text, label in zip(ds.texts, ds.labels, strict=True):
                f.write(json.dumps({"text": text, "label": label}) + "\n")
        specs.append(f"{ds.name}={path}")
    return ",".join(specs)


class Bench:
    """One model, its hook, and SAEs on it as `sae_mlops.evals.run.Loaded` targets."""

    def __init__(self, model_kind: str, d_sae: int, l0: int, context_size: int) -> None:
        import torch
        from benchmark_grid import cell_inputs

        self.model_kind, self.d_sae, self.l0 = model_kind, d_sae, l0
        self.cfg, self.inputs, batches = cell_inputs(model_kind, "topk", l0, d_sae, 2048)
        self.context_size = min(context_size, int(self.inputs.model.model.cfg.n_ctx))
        from sae_mlops.core.engine import Engine

        engine = Engine(self.inputs.model.model, self.inputs.sae.module, self.inputs.site, self.inputs.device)
        with torch.no_grad():
            act, _ = engine.hook_activations(batches[0].tokens)
            self.x = self.inputs.site.view(act)[batches[0].analysed].float()

    def random_loaded(self, seed: int):
        from benchmark_grid import random_sae

        from sae_mlops.sources.saelens import saelens_info
        from sae_mlops.sources.types import LoadedSAE

        sae = random_sae("topk", self.x.shape[1], self.d_sae, self.l0, self.inputs.site.name, self.x, seed=seed)
        return self.loaded(LoadedSAE(module=sae, info=saelens_info(sae, source=f"random-topk-{self.l0}-{self.d_sae}-{seed}",
                                                                   fmt="saelens")))

    def loaded(self, sae):
        from sae_mlops.config import EvalTarget
        from sae_mlops.core.engine import Engine
        from sae_mlops.evals.activations import model_fingerprint
        from sae_mlops.evals.run import Loaded

        model = self.inputs.model
        engine = Engine(model.model, sae.module, self.inputs.site, device="cpu", downstream=False)
        return Loaded(EvalTarget(sae=f"random-{self.model_kind}", device="cpu", context_size=self.context_size), sae, model,
                      engine, self.context_size, True, "cpu", model_fingerprint(model.model))


def probe(loaded, datasets: str, cache_dir: Path, out: Path):
    from sae_mlops.config import ProbeOptions
    from sae_mlops.evals.run import EvalsResult, run_probe

    r = EvalsResult()
    t, _ = timed(lambda: run_probe(loaded, ProbeOptions(datasets=datasets, cache_dir=str(cache_dir)), out, r))
    return t, r


def autointerp(bench: Bench, model_kind: str, tokens: int, features: int, out: Path) -> str:
    from benchmark_grid import cell_inputs
    from openai_stub import StubServer

    from sae_mlops.analyses.full import FullOptions, run_full
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.evals.autointerp import autointerp_metrics
    from sae_mlops.features.label import LabelOptions, label_features, read_done

    if model_kind == "demo":
        cfg = AnalysisConfig(sae=str(demo_sae_path("saelens")), model="demo", max_tokens=tokens, device="cpu", progress=False)
        inputs = None
    else:
        cfg, inputs, _ = cell_inputs(model_kind, "topk", bench.l0, bench.d_sae, tokens)
    full_t, _ = timed(lambda: run_full(cfg, out, FullOptions(examples_per_feature=8, heatmap_features=20), inputs=inputs))
    with StubServer() as server:
        label_t, res = timed(lambda: label_features(out, LabelOptions(model="stub", base_url=server.url, rpm=0, concurrency=4),
                                                    top=features))
    m = autointerp_metrics(read_done(res.labels_file))  # type: ignore[attr-defined]
    return (f"autointerp   {label_t.wall:7.1f} s wall {label_t.cpu:7.1f} s CPU for {features} features "
            f"({int(m['autointerp/features_scored'])} scored, {int(m['autointerp/features_not_scored'])} not), stub LLM; "
            f"after a full analysis of {tokens} tokens for its activation database: {full_t.wall:.1f} s wall")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,wide", help="demo, wide or both (comma-separated)")
    p.add_argument("--per-class", type=int, default=150, help="texts per class of the demo tasks")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--saes", type=int, default=5, help="SAEs sharing the hook in the cache measurement")
    p.add_argument("--d-sae", type=int, default=4096, help="latents of the random SAEs")
    p.add_argument("--l0", type=int, default=64, help="k of the random TopK SAEs")
    p.add_argument("--autointerp-features", type=int, default=20, help="0 skips the auto-interp timing")
    p.add_argument("--autointerp-tokens", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds are not inflated by spinning)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT / "tests"))

    import torch

    from sae_mlops.config import AbsorptionOptions
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.evals.run import EvalsResult, load_target, run_absorption

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # BLAS/OpenMP of numpy and scikit-learn too
    tmp = Path(tempfile.mkdtemp(prefix="bench_evals_"))
    datasets = demo_task_files(args.per_class, tmp / "tasks")
    print(f"start: {load()}; torch threads {args.threads}; demo tasks, {args.per_class} texts per class "
          f"(3 datasets, 7 tasks); context {args.context_size}; files in {tmp}")
    for model_kind in args.models.split(","):
        bench = Bench(model_kind, args.d_sae, args.l0, args.context_size)
        if model_kind == "demo":
            from sae_mlops.config import EvalTarget

            one = load_target(EvalTarget(sae=str(demo_sae_path("saelens")), device="cpu", context_size=args.context_size))
            what = f"demo SAELens SAE (d_sae {one.sae.info.d_sae})"
        else:
            one = bench.random_loaded(0)
            what = f"random TopK SAE (d_sae {args.d_sae}, k {args.l0})"
        d_model = int(bench.inputs.model.model.cfg.d_model)
        print(f"\n== {model_kind} model (d_model {d_model}, hook {bench.inputs.site.name}), {what}")
        cold, r = probe(one, datasets, tmp / model_kind / "cache-one", tmp / model_kind / "one")
        warm, r2 = probe(one, datasets, tmp / model_kind / "cache-one", tmp / model_kind / "one-warm")
        m = r.metrics
        print(f"probe cold   {cold.wall:7.1f} s wall {cold.cpu:7.1f} s CPU; model {r.cache.model_seconds:.1f} s, "
              f"codes and probes {cold.wall - r.cache.model_seconds:.1f} s ({r.cache.misses} miss(es))")
        print(f"probe warm   {warm.wall:7.1f} s wall {warm.cpu:7.1f} s CPU ({r2.cache.hits} hit(s)); accuracy SAE k=1 "
              f"{m['probe/sae_acc_k1']:.3f}, k=5 {m['probe/sae_acc_k5']:.3f}, raw k=1 {m['probe/raw_acc_k1']:.3f}, "
              f"dense {m['probe/dense_acc']:.3f}")
        ra = EvalsResult()
        abs_t, _ = timed(functools.partial(run_absorption, one, AbsorptionOptions(), tmp / model_kind / "abs", ra))
        print(f"absorption   {abs_t.wall:7.1f} s wall {abs_t.cpu:7.1f} s CPU; {ra.messages['absorption']}")
        if args.autointerp_features:
            print(autointerp(bench, model_kind, args.autointerp_tokens, args.autointerp_features, tmp / model_kind / "full"))

        saes = [bench.random_loaded(seed) for seed in range(args.saes)]
        cold_sum, shared_sum = Timed(0.0, 0.0), Timed(0.0, 0.0)
        cold_model = shared_model = 0.0
        for i, loaded in enumerate(saes):  # interleaved: SAE i cold, then SAE i with the shared cache
            t, rc = probe(loaded, datasets, tmp / model_kind / f"cache-cold-{i}", tmp / model_kind / f"cold-{i}")
            cold_sum = Timed(cold_sum.wall + t.wall, cold_sum.cpu + t.cpu)
            cold_model += rc.cache.model_seconds
            t, rs = probe(loaded, datasets, tmp / model_kind / "cache-shared", tmp / model_kind / f"shared-{i}")
            shared_sum = Timed(shared_sum.wall + t.wall, shared_sum.cpu + t.cpu)
            shared_model += rs.cache.model_seconds
        print(f"{args.saes} random TopK SAEs (d_sae {args.d_sae}, k {args.l0}) on one hook, probing:")
        print(f"  cold cache for each  {cold_sum.wall:7.1f} s wall {cold_sum.cpu:7.1f} s CPU (model {cold_model:.1f} s)")
        print(f"  one shared cache     {shared_sum.wall:7.1f} s wall {shared_sum.cpu:7.1f} s CPU (model {shared_model:.1f} s)")
        print(f"  saving {cold_sum.wall - shared_sum.wall:.1f} s wall ({1 - shared_sum.wall / cold_sum.wall:.0%}), "
              f"{cold_sum.cpu - shared_sum.cpu:.1f} s CPU ({1 - shared_sum.cpu / cold_sum.cpu:.0%}); "
              f"cold / shared = {cold_sum.wall / shared_sum.wall:.2f} wall, {cold_sum.cpu / shared_sum.cpu:.2f} CPU")
    print(f"\nend: {load()}")


if __name__ == "__main__":
    main()
