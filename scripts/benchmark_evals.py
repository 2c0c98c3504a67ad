"""Time each eval on the demo and the activation cache's saving when several SAEs share a hook.

    python scripts/benchmark_evals.py [--per-class 150] [--context-size 128] [--autointerp-features 20]

Probes the three demo SAEs (one hook, blocks.0.hook_resid_post) on the built-in demo tasks with a
fresh cache: the first SAE runs the model, the others read the cache. Prints per SAE the probe's
seconds, the model seconds inside it and the headline accuracies, then the cache's saving (the model
seconds a cacheless run would spend on every SAE), the absorption eval's time, and the auto-interp
eval's time on a small full analysis against the local OpenAI-compatible stub (tests/openai_stub.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=150, help="texts per class of the demo tasks")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--autointerp-features", type=int, default=20, help="0 skips the auto-interp timing")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import sae_mlops.evals.datasets as D
    from sae_mlops.config import AbsorptionOptions, EvalTarget, ProbeOptions
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.evals.run import EvalsResult, load_target, run_absorption, run_probe

    D.DEMO_PER_CLASS = args.per_class
    tmp = Path(tempfile.mkdtemp(prefix="bench_evals_"))
    print(f"k-sparse probing, demo tasks ({args.per_class} texts per class, context {args.context_size}), cache in {tmp / 'cache'}")
    print(f"{'SAE':10s} {'probe s':>8s} {'model s':>8s} {'cache':>10s} {'SAE k=1':>8s} {'SAE k=5':>8s} {'SAE k=50':>9s} {'raw k=1':>8s} {'dense':>6s}")
    model_first = 0.0
    total_probe = 0.0
    loaded = None
    for kind in ("standard", "batchtopk", "saelens"):
        loaded = load_target(EvalTarget(sae=str(demo_sae_path(kind)), device="cpu", context_size=args.context_size))
        r = EvalsResult()
        run_probe(loaded, ProbeOptions(cache_dir=str(tmp / "cache")), tmp / kind, r)
        m = r.metrics
        model_first = model_first or r.cache.model_seconds
        total_probe += r.seconds["probe"]
        print(f"{kind:10s} {r.seconds['probe']:8.1f} {r.cache.model_seconds:8.1f} {f'{r.cache.hits}h/{r.cache.misses}m':>10s} "
              f"{m['probe/sae_acc_k1']:8.3f} {m['probe/sae_acc_k5']:8.3f} {m.get('probe/sae_acc_k50', float('nan')):9.3f} "
              f"{m['probe/raw_acc_k1']:8.3f} {m['probe/dense_acc']:6.3f}")
    saving = 2 * model_first
    print(f"cache: 3 SAEs took {total_probe:.1f} s; without it each would run the model ({model_first:.1f} s): "
          f"{total_probe + saving:.1f} s, so the cache saves {saving:.1f} s ({saving / (total_probe + saving):.0%}); "
          f"five SAEs would save {4 * model_first:.1f} s")

    assert loaded is not None
    r = EvalsResult()
    run_absorption(loaded, AbsorptionOptions(), tmp / "abs", r)
    print(f"absorption (saelens SAE): {r.seconds['absorption']:.1f} s; {r.messages['absorption']}")

    if args.autointerp_features:
        sys.path.insert(0, str(ROOT / "tests"))
        from openai_stub import StubServer

        from sae_mlops.analyses.full import FullOptions, run_full
        from sae_mlops.config import AnalysisConfig
        from sae_mlops.evals.autointerp import autointerp_metrics
        from sae_mlops.features.label import LabelOptions, label_features, read_done

        out = tmp / "full"
        run_full(AnalysisConfig(sae=str(demo_sae_path("standard")), model="demo", max_tokens=5000, device="cpu", progress=False),
                 out, FullOptions(examples_per_feature=8, heatmap_features=20))
        with StubServer() as server:
            t0 = time.perf_counter()
            res = label_features(out, LabelOptions(model="stub", base_url=server.url, rpm=0, concurrency=4),
                                 top=args.autointerp_features)
            secs = time.perf_counter() - t0
        m = autointerp_metrics(read_done(res.labels_file))
        print(f"autointerp (standard SAE, 5000 tokens, stub LLM): {secs:.1f} s for {args.autointerp_features} features; "
              f"{int(m['autointerp/features_scored'])} scored, {int(m['autointerp/features_not_scored'])} not scored")


if __name__ == "__main__":
    main()
