"""Scale-out figures: shards, resume and Ray workers. Prints JSON; asserts nothing.

    python scripts/benchmark_scaleout.py                       # defaults below, about 10 minutes on 2 cores
    python scripts/benchmark_scaleout.py --tokens 131072 --shard-tokens 32768 --d-sae 16384 --k 128
    python scripts/benchmark_scaleout.py --ray-only --demo-model --kind quick --corpus big.json \
        --tokens 1000000 --shard-tokens 65536            # 2 workers over 1 at 1M tokens

The model is a randomly initialised GPT-2-style Hugging Face checkpoint written to a temporary
directory (``--d-model`` 512, ``--layers`` 4, 8 heads, the demo tokenizer's vocabulary), loaded by
every process the way a user's local checkpoint is (so Ray actors load it too); the SAE a random
SAELens TopK SAE (``--d-sae``, ``--k``) on ``blocks.1.hook_resid_post``; the corpus the demo corpus.
Random weights: fine for cost, meaningless for metrics. Every analysis runs as the CLI in a child
process with ``--no-track`` and is read back from its results JSON:

- ``one_shard``: local executor, one shard (the unsharded pass);
- ``sharded``: local executor, ``--shard-tokens`` shards: ``overhead_share`` = (saving shard state +
  merging, ``time/pass/checkpoint + time/pass/merge``) / ``time/pass``;
- ``ray_1`` / ``ray_2``: ``--executor ray`` with 1 and 2 actors of 1 thread each (a local Ray
  instance started by the CLI): throughput = tokens / ``time/ray_shards`` (the shards' wall time
  after the actors have loaded model and SAE, ``time/ray_actor_startup``), and ``speedup_2_over_1``
  (and ``speedup_2_over_1_end_to_end``, by process wall time); ``--ray-only`` runs only these two;
- ``resume``: the sharded run killed (SIGKILL) once half its shards are done, then the same command
  again: ``resume_cost_s`` = killed wall + resumed wall - uninterrupted wall (what the interruption
  cost beyond the lost partial shard is start-up, planning and loading the finished shards' state).

``--crossover`` measures instead when Ray pays, end to end as a user waits (process wall time):
local (this process, torch on every core) against ``--executor ray --workers 1`` and ``--workers 2``
(a local Ray instance, each actor half the cores), all at each of ``--crossover-tokens``. A
least-squares line ``wall = fixed + tokens / throughput`` per executor gives the fixed cost of a Ray
analysis over a local one (``ray_fixed_over_local_s`` for 2 workers, ``ray_1_fixed_over_local_s``
for 1) and the token count where the 2-worker line crosses the local one (none when Ray's per-token
cost is not lower, as on a machine whose cores the local pass already uses); the Ray runs also report their start-up
parts (``time/ray_start``: the local instance; ``time/ray_actor_startup``: actors loading model and SAE).

``--kind full`` (default) measures the full analysis (examples, co-occurrence, activation database
parts in every shard); ``--kind quick`` the quick one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SAE_CLI = [sys.executable, "-m", "sae_mlops.cli"]
HOOK = "blocks.1.hook_resid_post"


def build_assets(root: Path, d_model: int, layers: int, d_sae: int, k: int) -> tuple[Path, Path]:
    """A random GPT-2 checkpoint (with the demo tokenizer) and a random SAELens TopK SAE for it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae_mlops.demo import load_demo_tokenizer

    tok = load_demo_tokenizer()
    model_dir = root / "model"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_ctx=128, n_embd=d_model, n_layer=layers, n_head=8,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    meta = SAEMetadata(model_name=str(model_dir), hook_name=HOOK, hook_head_index=None, context_size=128,
                       prepend_bos=True)
    sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=k, dtype="float32", device="cpu", metadata=meta))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = torch.randn(d_sae, d_model, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae_dir = root / "sae"
    sae.save_model(str(sae_dir))
    return model_dir, sae_dir


def analysis(args, sae_dir: Path, out: Path, *extra: str) -> list[str]:
    model = ("--model", "demo") if args.demo_model else ()
    return [*SAE_CLI, args.kind, "--sae", str(sae_dir), *model, "--corpus", args.corpus, "--max-tokens",
            str(args.tokens), "--batch-size", str(args.batch_size), "--out", str(out), "--no-track", "-q", "--device",
            "cpu", *extra]


def run(cmd: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    out = Path(cmd[cmd.index("--out") + 1])
    return json.loads((out / "results" / "analysis_results.json").read_text()), wall


def killed_then_resumed(cmd: list[str], out: Path) -> dict:
    """Run ``cmd``, SIGKILL it once half of its shards are recorded as done, run it again."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = out / "checkpoint" / "manifest.json"
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            m = json.loads(manifest.read_text())
            if m["plan"] and len(m["done"]) >= max(1, len(m["plan"]) // 2):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_wall = time.perf_counter() - t0
    m = json.loads(manifest.read_text())
    res, resumed_wall = run(cmd)
    return {"killed_after_shards": len(m["done"]), "shards": len(m["plan"]), "killed_wall_s": killed_wall,
            "resumed_wall_s": resumed_wall, "resumed_time_pass_s": res["metrics"]["time/pass"],
            "resumed_merge_s": res["metrics"]["time/pass/merge"], "shards_resumed": res["params"]["shards_resumed"]}


def fit_line(tokens: list[int], walls: list[float]) -> tuple[float, float]:
    """(fixed seconds, seconds per token) of the least-squares line through (tokens, wall)."""
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(tokens, dtype=float), np.asarray(walls, dtype=float), 1)
    return float(intercept), float(slope)


def crossover(args, sae_dir: Path, root: Path) -> dict:
    """Local against Ray with 1 and 2 workers at each of ``args.crossover_tokens`` (see the module
    docstring); the crossover is the 2-worker one's."""
    cores = os.cpu_count() or 2
    per_worker = str(max(1, cores // 2))
    rows: dict[str, list[dict]] = {"local": [], "ray_1": [], "ray_2": []}
    for tokens in args.crossover_tokens:
        args.tokens = tokens
        for name in rows:
            extra = () if name == "local" else ("--executor", "ray", "--workers", name[-1], "--cpus-per-worker",
                                                per_worker, "--shard-tokens", str(max(tokens // 8, 4096)))
            res, wall = run(analysis(args, sae_dir, root / f"x-{name}-{tokens}", *extra))
            m = res["metrics"]
            rows[name].append({"tokens": tokens, "wall_s": wall, "time_pass_s": m["time/pass"],
                               "ray_start_s": m.get("time/ray_start"), "actor_startup_s": m.get("time/ray_actor_startup"),
                               "shards_wall_s": m.get("time/ray_shards")})
    out: dict = {"cores": cores, "cpus_per_worker": int(per_worker), "runs": rows}
    if len(args.crossover_tokens) >= 2:
        fits = {k: fit_line([r["tokens"] for r in v], [r["wall_s"] for r in v]) for k, v in rows.items()}
        (a_l, b_l), (a_r, b_r) = fits["local"], fits["ray_2"]
        out.update({"local_fixed_s": a_l, "local_tokens_per_s": 1 / b_l if b_l > 0 else None,
                    "ray_fixed_s": a_r, "ray_tokens_per_s": 1 / b_r if b_r > 0 else None,
                    "ray_fixed_over_local_s": a_r - a_l,
                    "ray_1_fixed_over_local_s": fits["ray_1"][0] - a_l,
                    "crossover_tokens": (a_r - a_l) / (b_l - b_r) if b_r < b_l else None})
    return out


def ray_workers(args, sae_dir: Path, root: Path, shards: tuple[str, ...], report: dict) -> None:
    """``ray_1`` and ``ray_2`` (1 and 2 actors of one thread) into ``report``, with
    ``speedup_2_over_1`` (shards' throughput) and ``speedup_2_over_1_end_to_end`` (process wall)."""
    for n in (1, 2):
        r, wall = run(analysis(args, sae_dir, root / f"ray{n}", *shards, "--executor", "ray", "--workers", str(n),
                               "--cpus-per-worker", "1"))
        rm = r["metrics"]
        tokens = r["metrics"]["tokens/analysed"]
        report[f"ray_{n}"] = {"wall_s": wall, "time_pass_s": rm["time/pass"], "tokens": tokens,
                              "actor_startup_s": rm["time/ray_actor_startup"], "shards_wall_s": rm["time/ray_shards"],
                              "tokens_per_s": tokens / rm["time/ray_shards"],
                              "worker_peak_rss_mib": rm["memory/worker_peak_rss_mib"],
                              "driver_peak_rss_mib": rm.get("memory/peak_rss_mib")}
    report["speedup_2_over_1"] = report["ray_2"]["tokens_per_s"] / report["ray_1"]["tokens_per_s"]
    report["speedup_2_over_1_end_to_end"] = report["ray_1"]["wall_s"] / report["ray_2"]["wall_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("quick", "full"), default="full")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=4, help="windows per batch; a pool (the shard unit) is 32 batches")
    p.add_argument("--shard-tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--local-only", action="store_true", help="only the one-shard and sharded local runs")
    p.add_argument("--crossover", action="store_true", help="only the local-against-Ray crossover (see above)")
    p.add_argument("--crossover-tokens", type=int, nargs="+", default=[16384, 65536, 196608],
                   help="token budgets of the crossover runs")
    p.add_argument("--ray-only", action="store_true",
                   help="only ray_1 and ray_2 (the 2-over-1 worker speed-up; e.g. at --tokens 1000000)")
    p.add_argument("--corpus", default="demo",
                   help="what --corpus the analyses get (the demo corpus holds 477,744 tokens: pass a larger "
                        "file for 1M tokens)")
    p.add_argument("--demo-model", action="store_true",
                   help="the demo model and its BatchTopK SAE instead of the wide model and a random TopK SAE")
    args = p.parse_args()
    report: dict = {"config": vars(args), "cpus": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="sae-mlops-scaleout-") as tmp:
        root = Path(tmp)
        if args.demo_model:
            from sae_mlops.demo import demo_sae_path

            sae_dir = demo_sae_path("batchtopk")
        else:
            _model_dir, sae_dir = build_assets(root, args.d_model, args.layers, args.d_sae, args.k)
        if args.crossover:
            report["crossover"] = crossover(args, sae_dir, root)
            json.dump(report, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        shards = ("--shard-tokens", str(args.shard_tokens))
        if args.ray_only:
            ray_workers(args, sae_dir, root, shards, report)
            json.dump(report, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        one, one_wall = run(analysis(args, sae_dir, root / "one", "--shard-tokens", str(10**9)))
        sharded_cmd = analysis(args, sae_dir, root / "sharded", *shards)
        sh, sh_wall = run(sharded_cmd)
        m1, ms = one["metrics"], sh["metrics"]
        overhead = ms.get("time/pass/checkpoint", 0.0) + ms["time/pass/merge"]
        report["one_shard"] = {"time_pass_s": m1["time/pass"], "wall_s": one_wall, "shards": one["params"]["shards"]}
        report["sharded"] = {"time_pass_s": ms["time/pass"], "wall_s": sh_wall, "shards": sh["params"]["shards"],
                             "checkpoint_s": ms.get("time/pass/checkpoint", 0.0), "merge_s": ms["time/pass/merge"],
                             "overhead_share": overhead / ms["time/pass"],
                             "pass_over_one_shard": ms["time/pass"] / m1["time/pass"]}
        if args.local_only:
            json.dump(report, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        ray_workers(args, sae_dir, root, shards, report)
        resume = killed_then_resumed(analysis(args, sae_dir, root / "resume", *shards), root / "resume")
        resume["resume_cost_s"] = resume["killed_wall_s"] + resume["resumed_wall_s"] - sh_wall
        report["resume"] = resume
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
