"""Benchmark: quick analysis throughput beside a bare forward pass over the same tokens.

Prints figures (no assertions). Usage:
    python scripts/benchmark_quick.py [--sae demo-standard] [--max-tokens 200000] [--batch-size 16]

Measured in one process on the same batches:
- tokenize: building the batches (windowing, masks);
- bare forward: model(tokens) -> logits for every batch (the cost of reading the model once);
- necessary: the model alone as ``scripts/_baseline.py`` counts it (forward to the hook, two continuations);
- quick: the whole quick pass (tokenization, model, SAE, collectors).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _baseline import necessary_model_compute  # scripts/ is on sys.path when run as a script

from sae_mlops.analyses.quick import base_collectors, make_batches, prepare
from sae_mlops.config import AnalysisConfig
from sae_mlops.core.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=None, help="SAE source (default: the demo standard SAE)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--max-tokens", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="take the best of N timings")
    args = ap.parse_args()
    if args.sae is None:
        from sae_mlops.demo import demo_sae_path

        args.sae = str(demo_sae_path("standard"))
    cfg = AnalysisConfig(sae=args.sae, model=args.model, corpus=args.corpus, max_tokens=args.max_tokens,
                         batch_size=args.batch_size, progress=False)
    inputs = prepare(cfg)
    model = inputs.model.model

    def timed(fn):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    batches = []
    t_tok = timed(lambda: batches.__setitem__(slice(None), list(make_batches(inputs, args.max_tokens))))
    n_tokens = sum(b.n_analysed for b in batches)

    @torch.no_grad()
    def bare():
        for b in batches:
            model(b.tokens.to(inputs.device), return_type="logits")

    engine = Engine(model, inputs.sae.module, inputs.site, inputs.device)

    def necessary():
        necessary_model_compute(engine, batches, inputs.device)

    def quick():
        engine.run(make_batches(inputs, args.max_tokens), base_collectors(inputs), progress=False)

    t_bare = timed(bare)
    t_nec = timed(necessary)
    t_quick = timed(quick)
    out = {
        "device": inputs.device,
        "torch_threads": torch.get_num_threads(),
        "sae": args.sae,
        "hook": inputs.site.name,
        "tokens_analysed": n_tokens,
        "batches": len(batches),
        "seconds": {"tokenize": t_tok, "bare_forward": t_bare, "necessary_model_compute": t_nec, "quick": t_quick},
        "tokens_per_s": {"bare_forward": n_tokens / t_bare, "quick": n_tokens / t_quick},
        "ratios": {"quick_over_bare_forward": t_quick / t_bare, "quick_over_necessary": t_quick / t_nec},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
