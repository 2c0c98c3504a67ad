"""Minimum reliable differences on the demo model: sampling noise and seed noise, measured.

Trains ``--seeds`` seeds of one recipe with ``train --seeds`` (`sae_mlops.training.train_seeds_and_log`:
child runs of one parent run, one recipe hash), runs the quick analysis of each seed's SAE on the
same token plan (`sae_mlops.workflows.run_quick_and_log`, so each run logs its per-block sums),
reads the block sums back from MLflow (`sae_mlops.tracking.artifacts.load_block_sums`) and prints,
for every judged metric (`sae_mlops.core.verdicts.VERDICT_METRICS`), as a markdown table:

- **sampling**: the median, over every pair of seeds, of the half-width of the 95 % paired
  block-bootstrap interval of their difference (`sae_mlops.core.intervals.paired_differences`): the
  smallest difference between two SAEs that one analysis of this token budget can resolve;
- **seed**: the seed noise floor `sae_mlops.core.verdicts.seed_floors` (``t_{0.975,n-1} * s * sqrt(2)``,
  ``s`` the between-seed standard deviation of the metric): the smallest difference between two
  single-seed SAEs of one recipe that is not reseed noise;
- **decides**: the larger of the two (the bound a verdict must clear).

Usage (about 2-4 minutes on two CPU cores with the defaults)::

    python scripts/noise_floors.py [--seeds 4] [--training-tokens 100000] [--max-tokens 32768]
                                   [--tracking-uri URI] [--work-dir DIR]

``--parent RUN_ID`` measures again from the seeds of an earlier run (no training; finished analyses of
the same budget are reused). Without ``--tracking-uri`` the runs go to a sqlite store in the work directory (a temporary one
unless ``--work-dir`` is given), so nothing is added to your own tracking server.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4, help="seeds of the recipe (at least 2)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--architecture", default="topk")
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--training-tokens", type=int, default=100_000)
    ap.add_argument("--max-tokens", type=int, default=32_768, help="quick-analysis token budget (one plan for all)")
    ap.add_argument("--tracking-uri", default=None, help="default: sqlite:///<work dir>/mlflow.db")
    ap.add_argument("--work-dir", default=None, help="SAEs, analyses and the default store (default: a temporary directory)")
    ap.add_argument("--parent", default=None, help="reuse the seeds of this `train --seeds` parent run (no training) and "
                    "each seed's finished quick analysis of the same budget, if any (needs the store that holds them)")
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error("--seeds must be at least 2 (a seed floor needs two seeds)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="sae-mlops-noise-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
        measure(args, work)
    return 0


def measure(args: argparse.Namespace, work: Path) -> None:
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.core.intervals import paired_differences
    from sae_mlops.core.verdicts import judged_metrics, seed_floors
    from sae_mlops.metrics import lookup
    from sae_mlops.tracking.artifacts import load_block_sums
    from sae_mlops.training import TrainConfig, train_seeds_and_log
    from sae_mlops.workflows import run_quick_and_log

    t0 = time.perf_counter()
    cfg = TrainConfig(architecture=args.architecture, d_sae=args.d_sae, k=args.k, training_tokens=args.training_tokens,
                      seed=args.first_seed, device="cpu")
    if args.parent:
        trained = existing_seeds(args.parent)
    else:
        trained = train_seeds_and_log(cfg, args.seeds, work / "saes", experiment="noise-floors")
    t_train = time.perf_counter() - t0
    sums, metrics = [], []
    for seed, outcome in zip(trained.seeds, trained.outcomes, strict=True):
        run_id = finished_analysis(outcome.run_id, args.max_tokens) if args.parent else None
        if run_id is None:
            acfg = AnalysisConfig(sae=str(outcome.model_uri), max_tokens=args.max_tokens, device="cpu", progress=False)
            quick = run_quick_and_log(acfg, work / "analysis" / f"seed-{seed}", experiment="noise-floors",
                                      run_name=f"quick · seed {seed}")
            run_id = quick.run_id
        assert run_id is not None
        blocks = load_block_sums(run_id)
        assert blocks is not None, f"run {run_id} logged no block sums"
        sums.append(blocks)
        metrics.append(blocks.point())
    t_all = time.perf_counter() - t0

    names = judged_metrics()
    floors = seed_floors({trained.recipe_hash: metrics}, names)
    half: dict[str, list[float]] = {n: [] for n in names}
    paired = True
    for a, b in itertools.combinations(sums, 2):
        for d in paired_differences(a, b):
            paired &= d.paired
            if d.metric in half and d.high == d.high:  # not NaN
                half[d.metric].append((d.high - d.low) / 2.0)

    out = sys.stdout
    out.write(f"recipe {trained.recipe_hash}: {cfg.architecture} d_sae={cfg.d_sae} k={cfg.k}, "
              f"{cfg.training_tokens} training tokens, seeds {trained.seeds}; quick analysis of {args.max_tokens} "
              f"tokens ({sums[0].n_blocks} blocks, {'paired' if paired else 'UNPAIRED'}); parent run "
              f"{trained.parent_run_id}; training {t_train:.0f}s, total {t_all:.0f}s\n\n")
    out.write("| metric | mean over seeds | seed sd | sampling MRD (median paired 95 % half-width) | "
              "seed MRD (floor) | decides |\n|---|---|---|---|---|---|\n")
    for n in names:
        m = lookup(n)
        assert m is not None
        vals = [float(x[n]) for x in metrics if n in x]
        if not vals:
            continue
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        samp = statistics.median(half[n]) if half[n] else float("nan")
        floor = floors.get(n, float("nan"))
        decides = "n/a (no spread)" if samp == 0 and floor == 0 else "seed" if floor > samp else \
            "sampling" if samp == samp else "n/a"
        unit = f" {m.unit}" if getattr(m, "unit", "") else ""
        out.write(f"| {m.label} (`{n}`){unit} | {statistics.fmean(vals):.6g} | {sd:.3g} | {samp:.3g} | {floor:.3g} "
                  f"| {decides} |\n")


def existing_seeds(parent_run_id: str):
    """The SeedsOutcome-like record of an existing ``train --seeds`` parent run (children by seed)."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    children = sorted(children, key=lambda r: int(r.data.tags["sae_mlops.seed"]))
    outcomes = [SimpleNamespace(run_id=r.info.run_id, model_uri=f"models:/{r.data.tags['sae_mlops.logged_model_id']}")
                for r in children]
    return SimpleNamespace(parent_run_id=parent_run_id, recipe_hash=parent.data.tags["sae_mlops.recipe_hash"],
                           seeds=[int(r.data.tags["sae_mlops.seed"]) for r in children], outcomes=outcomes)


def finished_analysis(source_run_id: str, max_tokens: int) -> str | None:
    """A FINISHED quick analysis of the SAE of `source_run_id` with this token budget, if any."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.`sae_mlops.source_run_id` = '{source_run_id}' and "
                              "tags.`sae_mlops.kind` = 'quick' and attributes.status = 'FINISHED'")
    for r in runs:
        if r.data.params.get("max_tokens") == str(max_tokens):
            return r.info.run_id
    return None


if __name__ == "__main__":
    sys.exit(main())
