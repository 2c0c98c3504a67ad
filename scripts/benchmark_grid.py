"""Benchmark grid: the full analysis's cost over SAE shapes and two models. Prints JSON; asserts nothing.

    python scripts/benchmark_grid.py --cells demo:topk:128:4096,wide:standard:200:4096 --tokens 16000
    python scripts/benchmark_grid.py --models demo,wide --kinds topk,standard --l0 16,64,128,256 \\
        --d-sae 512,4096,16384,65536 --tokens 20000          # the whole grid (hours on 2 CPU cores)

A cell is ``model:kind:l0:d_sae``:

- model ``demo``: the demo model (2 layers, d_model 64, vocab 2048); ``wide``: a randomly
  initialised HookedTransformer (4 layers, d_model 512, 8 heads, d_mlp 2048, vocab 32768, LN,
  GELU) run on the demo corpus's token ids, so the model/collector balance of a real model shows
  (its unembedding is as wide as a real vocabulary); ``qwen3``: a random Qwen3 Hugging Face
  checkpoint (``QWEN3``: 4 layers, d_model 256, grouped-query attention, SwiGLU, RMSNorm, rotary;
  the demo tokenizer's vocabulary) written to a temporary directory and loaded by the tool's own
  loader as a user's local checkpoint is, hooked at ``blocks.2.hook_resid_post``; about as fast as the
  Qwen3-architecture checkpoint of issue 23 (d_sae 512 there: 70k tokens in 5.6 s of model compute);
- kind ``topk``: a SAELens TopK SAE with k = l0; ``standard``: a SAELens ReLU SAE whose encoder
  biases are set so that each feature fires on a fraction l0 / d_sae of the first batch's
  activations (L0 ~ l0);
- random weights (unit-norm decoder rows): good for cost, meaningless for metrics.

Per cell, in a fresh child process (so that its peak RSS is its own):

- two baselines on the same batches (``scripts/_baseline.py``), each the median of ``--repeats``
  interleaved runs: ``necessary_model_s`` (the model alone: forward to the hook, the clean and
  SAE-spliced continuations) and ``necessary_s`` (that plus the SAE's encoder and decoder on every
  analysed token: what any analysis must do);
- ``pass_s``, ``pass_over_necessary`` (against model + SAE: the honest limit) and
  ``pass_over_model`` (against the model alone); the same in process CPU time (``*_cpu_s``,
  ``pass_over_necessary_cpu``, ``pass_over_model_cpu``), which a machine shared with other work
  disturbs less (use ``--threads 1``, the default, so that spinning worker threads add no CPU
  time); ``pass_parts_s``: seconds per part of the pass (batches, model + SAE + CE/KL, the shared
  sparse view, every collector), ``pass_shares`` (each part's share of the pass) and
  ``collector_shares`` (each collector's share of the pass, CPU time);
- ``stages_s``: every stage of ``run_full`` (import, load, pass, database, matrices, logit_lens,
  summaries, plots, reports), ``after_pass_s`` (their sum after the pass);
- ``peak_rss_mib`` (``VmHWM`` of the child), ``artifact_bytes`` (every file written), ``l0``
  (measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _process_env  # noqa: F401, I001 - first: numpy reads NUMPY_MADVISE_HUGEPAGE when imported
import torch
from _baseline import necessary_compute, necessary_model_compute  # scripts/ is on sys.path when run as a script

AFTER_PASS = ("database", "matrices", "logit_lens", "summaries", "plots", "reports")


def wide_model(tokenizer, n_ctx: int = 128, d_vocab: int = 32768, seed: int = 0):
    """A random HookedTransformer with a real model's width (see the module docstring)."""
    from sae_mlops.demo.lm import build_model

    torch.manual_seed(seed)
    cfg = {"model_name": "random-wide", "n_layers": 4, "d_model": 512, "n_heads": 8, "d_head": 64, "d_mlp": 2048,
           "n_ctx": n_ctx, "d_vocab": d_vocab, "act_fn": "gelu", "normalization_type": "LN",
           "positional_embedding_type": "standard", "default_prepend_bos": True, "seed": seed}
    model = build_model(cfg, tokenizer)
    model.eval()
    return model


#: the ``qwen3`` model's shape: a small Qwen3 (RMSNorm, rotary, grouped-query attention with
#: q/k norms, SwiGLU, tied embeddings), hooked at the middle layer's residual stream
QWEN3 = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": True}


def qwen3_checkpoint(root: Path, tokenizer, n_ctx: int = 128, seed: int = 0) -> Path:
    """A random Qwen3ForCausalLM checkpoint (`QWEN3`, the demo tokenizer's vocabulary) saved with its
    tokenizer under ``root``: a user's local checkpoint, loaded by the tool's own loader."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=n_ctx, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **QWEN3)
    Qwen3ForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def random_sae(kind: str, d_in: int, d_sae: int, l0: int, hook: str, x: torch.Tensor, seed: int = 0):
    """A SAELens TopK (k = l0) or standard SAE (L0 ~ l0 on ``x``) with random weights."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(seed)
    meta = SAEMetadata(model_name="benchmark", hook_name=hook, hook_head_index=None, context_size=128, prepend_bos=True)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=l0, dtype="float32", device="cpu", metadata=meta))
    elif kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", metadata=meta))
    else:
        raise SystemExit(f"unknown SAE kind {kind!r}; use topk or standard")
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(x.mean(0))
        sae.b_enc.zero_()
        if kind == "standard":
            pre = (x - x.mean(0)) @ sae.W_enc
            q = torch.quantile(pre[: min(len(pre), 4096)], 1 - l0 / d_sae, dim=0)
            sae.b_enc.copy_(-q)
    sae.requires_grad_(False)
    sae.eval()
    return sae


def cell_inputs(model_kind: str, kind: str, l0: int, d_sae: int, tokens: int):
    """A cell's config, inputs (the demo or wide model, a random SAE of the cell's kind, L0 and width
    in place of the demo SAE) and batches; shared with scripts/benchmark_intervals.py."""
    from sae_mlops.analyses.quick import make_batches, prepare
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.core.engine import Engine, HookSite
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.sources.saelens import saelens_info
    from sae_mlops.sources.types import LoadedModel, LoadedSAE

    cfg = AnalysisConfig(sae=str(demo_sae_path("batchtopk")), model="demo", max_tokens=tokens, progress=False, device="cpu")
    inputs = prepare(cfg)
    hook = inputs.site.name
    if model_kind == "wide":
        model = wide_model(inputs.model.tokenizer, n_ctx=inputs.plan.context_size)
        inputs.model = LoadedModel(model=model, name="random-wide", tokenizer=inputs.model.tokenizer, source="random")
        inputs.site = HookSite.for_model(model, hook)
    elif model_kind == "qwen3":
        import atexit
        import shutil

        from sae_mlops.sources.model import load_model

        root = Path(tempfile.mkdtemp(prefix="grid-qwen3-"))
        atexit.register(shutil.rmtree, root, True)
        inputs.model = load_model(str(qwen3_checkpoint(root, inputs.model.tokenizer, n_ctx=inputs.plan.context_size)),
                                  device="cpu")
        hook = f"blocks.{QWEN3['num_hidden_layers'] // 2}.hook_resid_post"
        inputs.site = HookSite.for_model(inputs.model.model, hook)
    elif model_kind != "demo":
        raise SystemExit(f"unknown model {model_kind!r}; use demo, wide or qwen3")
    batches = list(make_batches(inputs, tokens))
    engine = Engine(inputs.model.model, inputs.sae.module, inputs.site, inputs.device)
    with torch.no_grad():
        act, _ = engine.hook_activations(batches[0].tokens)
        x = inputs.site.view(act)[batches[0].analysed].float()
    sae = random_sae(kind, x.shape[1], d_sae, l0, hook, x)
    inputs.sae = LoadedSAE(module=sae, info=saelens_info(sae, source=f"random-{kind}-{l0}-{d_sae}", fmt="saelens"))
    return cfg, inputs, batches


def cell(model_kind: str, kind: str, l0: int, d_sae: int, tokens: int, repeats: int = 3) -> dict:
    """One grid cell, in this process (the parent runs it in a child)."""
    from sae_mlops.core.engine import Engine
    from sae_mlops.analyses.full import run_full

    cfg, inputs, batches = cell_inputs(model_kind, kind, l0, d_sae, tokens)
    sae = inputs.sae.module
    engine = Engine(inputs.model.model, sae, inputs.site, inputs.device)
    necessary_compute(engine, batches[:1], inputs.device)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"model": [], "model_sae": []}
    for _ in range(repeats):  # interleaved, so that a slow minute on a shared machine hits both
        for name, fn in (("model", necessary_model_compute), ("model_sae", necessary_compute)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(engine, batches, inputs.device)
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
    model_s, model_cpu = (statistics.median(x[i] for x in runs["model"]) for i in (0, 1))
    necessary, necessary_cpu = (statistics.median(x[i] for x in runs["model_sae"]) for i in (0, 1))
    with tempfile.TemporaryDirectory() as tmp:
        out = run_full(cfg, Path(tmp), inputs=inputs)
        artifact_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        dense_files = sorted(p.name for p in Path(tmp).rglob("feature_*.npy"))
    m = out.result.metrics
    stages = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("time/") and k.count("/") == 1}
    parts = {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("time/pass/")}
    cpu = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("time_cpu/") and k.count("/") == 1}
    cpu_parts = {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("time_cpu/pass/")}
    pass_s = m["time/pass"]
    return {
        "model": model_kind, "kind": kind, "l0_target": l0, "d_sae": d_sae,
        "l0": m.get("sparsity/l0_mean"), "tokens": m["tokens/analysed"],
        "necessary_model_s": model_s, "necessary_s": necessary, "pass_s": pass_s,
        "pass_over_necessary": pass_s / necessary, "pass_over_model": pass_s / model_s,
        "necessary_model_cpu_s": model_cpu, "necessary_cpu_s": necessary_cpu, "pass_cpu_s": m["time_cpu/pass"],
        "pass_over_necessary_cpu": m["time_cpu/pass"] / necessary_cpu,
        "pass_over_model_cpu": m["time_cpu/pass"] / model_cpu,
        "pass_parts_s": parts, "pass_shares": {k: v / pass_s for k, v in parts.items()},
        "collector_shares": {k: v / m["time_cpu/pass"] for k, v in cpu_parts.items()
                             if k not in ("batches", "model", "sparse_codes", "checkpoint")},
        "pass_parts_cpu_s": cpu_parts, "necessary_cpu_per_part": {k: v / necessary_cpu for k, v in cpu_parts.items()},
        "stages_s": stages, "after_pass_s": sum(stages.get(k, 0.0) for k in AFTER_PASS),
        "stages_cpu_s": cpu, "after_pass_cpu_s": sum(cpu.get(k, 0.0) for k in AFTER_PASS),
        "peak_rss_mib": _peak_rss_mib(), "artifact_bytes": artifact_bytes, "dense_files": dense_files,
        "torch_threads": torch.get_num_threads(),
    }


def _peak_rss_mib() -> float:
    from sae_mlops.telemetry import peak_rss_mib

    return peak_rss_mib()


def _cells(args) -> list[tuple[str, str, int, int]]:
    if args.cells:
        out = []
        for c in args.cells.split(","):
            m, k, l0, d = c.split(":")
            out.append((m, k, int(l0), int(d)))
        return out
    return [(m, k, int(l0), int(d)) for m in args.models.split(",") for k in args.kinds.split(",")
            for l0 in args.l0.split(",") for d in args.d_sae.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="", help="comma list of model:kind:l0:d_sae (overrides the grid options)")
    ap.add_argument("--models", default="demo,wide")
    ap.add_argument("--kinds", default="topk,standard")
    ap.add_argument("--l0", default="16,64,128,256")
    ap.add_argument("--d-sae", default="512,4096,16384,65536")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per cell (1: CPU-time ratios stay meaningful on a shared machine)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each baseline (their median is used)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        m, k, l0, d = args.child.split(":")
        print(json.dumps(cell(m, k, int(l0), int(d), args.tokens, args.repeats)))
        return
    results = []
    for m, k, l0, d in _cells(args):
        res = subprocess.run([sys.executable, __file__, "--child", f"{m}:{k}:{l0}:{d}", "--tokens", str(args.tokens),
                              "--threads", str(args.threads), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            results.append({"cell": f"{m}:{k}:{l0}:{d}", "error": res.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
