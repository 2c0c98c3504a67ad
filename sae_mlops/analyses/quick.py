"""Quick analysis: resolve inputs, one streaming pass with collectors, one result.

Quick and full analysis are the same pass with different collectors and budgets; this module holds
what both share (:func:`prepare`, :func:`run_pass`) and the quick entry point :func:`run_quick`.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import torch

from sae_mlops import __version__
from sae_mlops.core.collectors.base import Collector
from sae_mlops.core.collectors.downstream import DownstreamCollector
from sae_mlops.core.collectors.reconstruction import ReconstructionCollector
from sae_mlops.core.collectors.sparsity import SparsityCollector
from sae_mlops.config import AnalysisConfig, ExecutionOptions
from sae_mlops.core.engine import Engine, HookSite, PassStats, resolve_device
from sae_mlops.errors import InputError
from sae_mlops.core.results import AnalysisResult
from sae_mlops.sources.types import Corpus, LoadedModel, LoadedSAE
from sae_mlops.telemetry import Stages, device_params

if TYPE_CHECKING:
    from sae_mlops.analyses.sharding import PassObserver, ShardedPass
    from sae_mlops.config import FullOptions
from sae_mlops.core.tokens import WindowPlan, check_enough_tokens, iter_batches, make_plan

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_SIZE = 128


@dataclass
class Inputs:
    """Everything resolved and checked before the heavy work starts."""

    cfg: AnalysisConfig
    sae: LoadedSAE
    model: LoadedModel
    corpus: Corpus
    site: HookSite
    plan: WindowPlan
    device: str
    warnings: list[str] = field(default_factory=list)
    stages: Stages = field(default_factory=Stages)  # seconds per stage (cost telemetry)


def prepare(cfg: AnalysisConfig) -> Inputs:
    """Load SAE, model and corpus and check they fit together (hook, d_in, tokenizer, context).

    Timed as ``time/import`` (the loaders and TransformerLens) and ``time/load`` (the rest)."""
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise InputError(f"token budget {cfg.max_tokens} must be at least 1; pass --max-tokens 1 or more.")
    if cfg.topk_mode not in (None, "batch", "threshold"):
        raise InputError(f"unknown top-k mode '{cfg.topk_mode}'; use --topk-mode batch or --topk-mode threshold.")
    stages = Stages()
    with stages.stage("import"):
        import transformer_lens  # noqa: F401 - every model runs as a HookedTransformer; timed here

        from sae_mlops.sources.corpus import load_corpus
        from sae_mlops.sources.model import load_model
        from sae_mlops.sources.sae import load_sae
        from sae_mlops.sources.validate import check_compatible

    with stages.stage("load"):
        inputs = _prepare(cfg, load_corpus, load_model, load_sae, check_compatible)
    inputs.stages = stages
    return inputs


def _prepare(cfg: AnalysisConfig, load_corpus, load_model, load_sae, check_compatible) -> Inputs:
    device = resolve_device(cfg.device)
    sae = load_sae(cfg.sae, sae_id=cfg.sae_id, device=device, topk_mode=cfg.topk_mode, threshold=cfg.threshold)
    model_name = cfg.model or sae.info.model_name
    if not model_name:
        raise InputError(
            f"the SAE '{cfg.sae}' does not record which model it was trained on; pass --model "
            "(a TransformerLens name, a local checkpoint directory or 'demo')."
        )
    corpus_path = cfg.corpus or ("demo" if model_name == "demo" else None)
    if corpus_path is None:
        raise InputError("no corpus given; pass --corpus (JSON list of strings, JSONL, Parquet or .txt).")
    corpus = load_corpus(corpus_path, text_field=cfg.text_field)
    # SAELens records how the model was loaded in training (e.g. center_writing_weights): load it the same way
    model = load_model(model_name, device=device, dtype=cfg.dtype,
                       from_pretrained_kwargs=sae.info.extra.get("model_from_pretrained_kwargs"))
    warnings = list(check_compatible(sae, model, hook_override=cfg.hook))
    hook_name = cfg.hook or sae.info.hook_name
    site = HookSite.for_model(model.model, hook_name, sae.info.hook_head_index)

    n_ctx = int(model.model.cfg.n_ctx)
    context_size = cfg.context_size or sae.info.context_size or min(DEFAULT_CONTEXT_SIZE, n_ctx)
    if context_size > n_ctx:
        if cfg.context_size:
            raise InputError(
                f"context size {context_size} exceeds the model's n_ctx {n_ctx}; pass --context-size {n_ctx} or less."
            )
        warnings.append(f"the SAE's context size {context_size} exceeds the model's n_ctx {n_ctx}; using {n_ctx}.")
        context_size = n_ctx
    prepend_bos = cfg.prepend_bos
    if prepend_bos is None:
        prepend_bos = sae.info.prepend_bos
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.model.cfg, "default_prepend_bos", True))
    plan = make_plan(model.tokenizer, context_size, prepend_bos)
    check_enough_tokens(corpus.texts, model.tokenizer, plan, cfg.max_tokens, corpus.path)
    for w in warnings:
        log.warning(w)
    return Inputs(cfg, sae, model, corpus, site, plan, device, warnings)


def make_batches(inputs: Inputs, max_tokens: int | None):
    return iter_batches(inputs.corpus.texts, inputs.model.tokenizer, inputs.plan, inputs.cfg.batch_size, max_tokens)


def calibrate_threshold(inputs: Inputs, engine: Engine) -> None:
    """Threshold mode without a given theta: theta = mean over batches of the smallest value the
    batch rule keeps, on the first ``threshold_calibration_tokens`` analysed tokens."""
    module = inputs.sae.module
    if inputs.sae.info.topk_mode != "threshold" or getattr(module, "threshold", None) is not None:
        return
    values: list[float] = []
    n = 0
    for batch in make_batches(inputs, inputs.cfg.threshold_calibration_tokens):
        act, _ = engine.hook_activations(batch.tokens.to(inputs.device))
        x = inputs.site.view(act)[batch.analysed.to(inputs.device)]
        values.append(module.min_kept_value(x.to(engine.sae_dtype)))  # type: ignore[attr-defined]  # prior-format BatchTopK
        n += x.shape[0]
    theta = float(sum(values) / len(values))
    module.threshold = theta  # type: ignore[attr-defined]
    inputs.sae.info.threshold = theta
    inputs.sae.info.extra["threshold_estimated_on_tokens"] = n
    log.info("estimated threshold theta=%.6g on %d tokens (%d batches)", theta, n, len(values))


def available_tokens(inputs: Inputs, budget: int | None) -> int:
    """Analysed tokens the pass will take: min(budget, the corpus's analysable tokens), counted by
    tokenizing the corpus up to the budget (the progress bar's total, so its ETA is right)."""
    from sae_mlops.core.tokens import count_analysed, iter_windows

    special = set(inputs.plan.special_ids)
    special_ids = torch.tensor(sorted(special), dtype=torch.long)
    n = 0
    for window in iter_windows(inputs.corpus.texts, inputs.model.tokenizer, inputs.plan):
        n += count_analysed(window, special, special_ids)
        if budget is not None and n >= budget:
            return budget
    return n


def run_pass(inputs: Inputs, collectors: list[Collector], downstream: bool = True, on_step=None) -> PassStats:
    """Threshold calibration if needed, then one unsharded streaming pass with ``collectors`` (tests
    and benchmarks; the analyses run :func:`run_sharded_pass`)."""
    engine = Engine(inputs.model.model, inputs.sae.module, inputs.site, inputs.device, downstream=downstream)
    with inputs.stages.stage("calibration"):
        calibrate_threshold(inputs, engine)
    budget = inputs.cfg.max_tokens
    total = available_tokens(inputs, budget) if inputs.cfg.progress else budget
    if str(inputs.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(inputs.device))
    with inputs.stages.stage("pass"):
        stats = engine.run(
            make_batches(inputs, budget), collectors, total_tokens=total, progress=inputs.cfg.progress, on_step=on_step
        )
    if stats.tokens_analysed == 0 or (downstream and stats.predictions == 0):
        raise _too_short(inputs, stats.tokens_analysed, stats.predictions)
    return stats


def _too_short(inputs: Inputs, tokens: int, predictions: int) -> InputError:
    return InputError(
        f"the corpus '{inputs.corpus.path}' is too short: {tokens} analysable tokens and "
        f"{predictions} next-token predictions; give longer texts or more of them."
    )


def run_sharded_pass(
    inputs: Inputs,
    kind: str,
    out: Path,
    exec_opts: ExecutionOptions | None = None,
    opts: FullOptions | None = None,
    resume: bool = False,
    observer: PassObserver | None = None,
) -> ShardedPass:
    """Threshold calibration if needed, then the pass in shards (``exec_opts``: local or on Ray),
    checkpointed under ``out/checkpoint`` and resumed from there when an unfinished pass of the same
    fingerprint is found (``resume``: one must be). Timed as stages ``calibration``, ``plan`` (cutting
    the corpus into shards) and ``pass`` (the shards, including checkpoint writes and the merge)."""
    from tqdm.auto import tqdm

    from sae_mlops.analyses.sharding import make_collectors, open_checkpoint, run_local

    exec_opts = exec_opts or ExecutionOptions()
    engine = Engine(inputs.model.model, inputs.sae.module, inputs.site, inputs.device)
    with inputs.stages.stage("calibration"):
        calibrate_threshold(inputs, engine)
    with inputs.stages.stage("plan"):
        ck = open_checkpoint(inputs, kind, out, exec_opts, opts, resume)
    total = sum(s.tokens for s in ck.plan)
    if total == 0:
        raise _too_short(inputs, 0, 0)
    budget = inputs.cfg.max_tokens
    if budget and total < budget:
        log.info("the corpus '%s' holds %s analysable tokens, fewer than the budget --max-tokens %s: all of them are "
                 "analysed", inputs.corpus.path, f"{total:,}", f"{budget:,}")
    ck.save()
    if observer is not None:
        observer.started(ck, total)
        ck.save()

    def factory(parts_dir: Path | None, prefix: str) -> list[Collector]:
        return make_collectors(kind, inputs, opts, parts_dir, prefix, blocks=ck.blocks)

    if str(inputs.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(inputs.device))
    bar = tqdm(total=total, initial=ck.tokens_done, unit="tok", unit_scale=True, desc="analysing",
               disable=not inputs.cfg.progress)
    try:
        with inputs.stages.stage("pass"):
            if exec_opts.executor == "ray":
                from sae_mlops.analyses.ray_shards import run_ray

                result = run_ray(inputs, kind, opts, exec_opts, ck, factory, bar, observer)
            else:
                result = run_local(inputs, engine, ck, factory, bar, observer)
    finally:
        bar.close()
    stats = result.stats
    if stats.tokens_analysed == 0 or stats.predictions == 0:
        raise _too_short(inputs, stats.tokens_analysed, stats.predictions)
    return result


def base_collectors(inputs: Inputs) -> list[Collector]:
    info = inputs.sae.info
    return [
        SparsityCollector(info.d_sae, inputs.cfg.rare_threshold, inputs.cfg.dense_threshold),
        ReconstructionCollector(info.d_in),
        DownstreamCollector(),
    ]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def resolved_params(inputs: Inputs, stats: PassStats) -> dict[str, Any]:
    """Every input and resolved value, flat, for MLflow params and the results JSON (None = absent;
    the tracking layer leaves absent values out of the run's params). ``sae_name`` is the short name
    of `sae_mlops.naming.sae_name`; ``topk_k`` is the SAE's k for every TopK-style SAE (the prior
    format's ``top_k``, SAELens ``cfg.json`` ``k``)."""
    from sae_mlops.naming import sae_name

    cfg, info = inputs.cfg, inputs.sae.info
    k = info.k if info.k is not None else (info.extra or {}).get("k")
    return {
        "sae": cfg.sae,
        "sae_name": sae_name(cfg.sae, cfg.sae_id),
        "sae_id": cfg.sae_id,
        "sae_format": info.format,
        "sae_architecture": info.architecture,
        "sae_hash": info.content_hash,
        "d_in": info.d_in,
        "d_sae": info.d_sae,
        "hook": inputs.site.name,
        "hook_layer": info.hook_layer,
        "hook_head_index": info.hook_head_index,
        "hook_path": "start_at_layer" if inputs.site.resume_layer is not None else "hooked_forward",
        "topk_mode": info.topk_mode,
        "topk_k": k,
        "topk_threshold": info.threshold,
        "topk_threshold_estimated_on_tokens": info.extra.get("threshold_estimated_on_tokens"),
        "model": inputs.model.name,
        "model_source": inputs.model.source,
        "sae_recorded_model": info.model_name,
        "corpus": inputs.corpus.path,
        "corpus_format": inputs.corpus.format,
        "corpus_digest": inputs.corpus.digest,
        "corpus_documents": len(inputs.corpus.texts),
        "corpus_dropped_empty": inputs.corpus.n_dropped_empty,
        "max_tokens": cfg.max_tokens,
        "tokens_analysed": stats.tokens_analysed,
        "context_size": inputs.plan.context_size,
        "prepend_bos": inputs.plan.prepend_bos,
        "batch_size": cfg.batch_size,
        "tokens_per_batch_mean": round(stats.tokens_analysed / max(stats.batches, 1), 2),
        "special_token_ids": ",".join(map(str, inputs.plan.special_ids)),
        "rare_threshold": cfg.rare_threshold,
        "dense_threshold": cfg.dense_threshold,
        "device": inputs.device,
        **device_params(inputs.device),
        "dtype": cfg.dtype,
        "version_sae_mlops": __version__,
        "version_torch": torch.__version__,
        "version_transformer_lens": _package_version("transformer-lens"),
        "version_sae_lens": _package_version("sae-lens"),
        "version_python": platform.python_version(),
    }


def assemble_result(kind: str, inputs: Inputs, stats: PassStats, collectors: list[Collector]) -> AnalysisResult:
    from sae_mlops.naming import sae_name

    metrics: dict[str, float] = {}
    warnings = list(inputs.warnings)
    per_feature: dict[str, list[float]] = {}
    for c in collectors:
        metrics.update(c.compute())
        warnings.extend(getattr(c, "warnings", []))
        if isinstance(c, SparsityCollector):
            per_feature = c.per_feature()
    info = inputs.sae.info
    if info.ever_fired is not None:
        metrics["features/train_dead_count"] = int((~info.ever_fired.bool()).sum())
    metrics.update(
        {
            "tokens/analysed": stats.tokens_analysed,
            "tokens/predictions": stats.predictions,
            "tokens/windows": stats.windows,
            "tokens/batches": stats.batches,
            "speed/seconds": stats.seconds,
            "speed/tokens_per_s": stats.tokens_analysed / stats.seconds if stats.seconds > 0 else 0.0,
        }
    )
    metrics.update(inputs.stages.metrics(inputs.device))
    metrics.update({f"time/pass/{k}": v for k, v in stats.part_seconds.items()})
    metrics.update({f"time_cpu/pass/{k}": v for k, v in stats.part_cpu_seconds.items()})
    for w in warnings[len(inputs.warnings) :]:
        log.warning(w)
    block_sums, interval_details = _intervals(inputs, collectors, metrics)
    tags = dict(info.lineage)
    tags["sae_mlops.kind"] = kind
    if info.content_hash:
        tags["sae_mlops.sae_hash"] = info.content_hash
    return AnalysisResult(
        kind=kind,
        params=resolved_params(inputs, stats),
        metrics=metrics,
        tags=tags,
        per_feature=per_feature,
        details={
            "thresholds": {"dead": 0.0, "rare": inputs.cfg.rare_threshold, "dense": inputs.cfg.dense_threshold},
            "sae_name": sae_name(inputs.cfg.sae, inputs.cfg.sae_id),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"intervals": interval_details} if interval_details else {}),
        },
        warnings=warnings,
        block_sums=block_sums,
    )


def _intervals(inputs: Inputs, collectors: list[Collector], metrics: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """The per-block sums of the pass (when a :class:`BlockStatsCollector` ran) and the 95 % bootstrap
    interval of every metric they determine, added to ``metrics`` as ``<name>_ci_low`` /
    ``<name>_ci_high`` (method: :mod:`sae_mlops.core.intervals`). Timed as ``time/intervals``."""
    from sae_mlops.core.collectors.blocks import BlockStatsCollector
    from sae_mlops.core.intervals import DEFAULT_LEVEL, DEFAULT_RESAMPLES, DEFAULT_SEED, BlockSums, bootstrap_intervals
    from sae_mlops.metrics import ci_names

    blocks = next((c for c in collectors if isinstance(c, BlockStatsCollector)), None)
    if blocks is None:
        return None, {}
    t0 = time.perf_counter()
    cfg, info = inputs.cfg, inputs.sae.info
    plan = {"corpus_digest": inputs.corpus.digest, "model": inputs.model.name, "context_size": inputs.plan.context_size,
            "prepend_bos": inputs.plan.prepend_bos, "batch_size": cfg.batch_size, "max_tokens": cfg.max_tokens,
            "layout": blocks.layout.digest(), "hook": inputs.site.name}
    sums = BlockSums(blocks.arrays(), info.d_in, info.d_sae, cfg.rare_threshold, cfg.dense_threshold, plan)
    intervals = bootstrap_intervals(sums)
    for name, iv in intervals.items():
        if name in metrics:
            low, high = ci_names(name)
            metrics[low], metrics[high] = iv.low, iv.high
    metrics["stats/blocks"] = sums.n_blocks
    metrics["time/intervals"] = time.perf_counter() - t0
    details = {"method": "percentile block bootstrap of metrics recomputed from resampled per-block sums",
               "level": DEFAULT_LEVEL, "resamples": DEFAULT_RESAMPLES, "seed": DEFAULT_SEED, "blocks": sums.n_blocks,
               "windows": blocks.layout.windows, "plan": plan}
    return sums, details


def sharding_params(result: ShardedPass, exec_opts: ExecutionOptions) -> dict[str, Any]:
    """Params saying how the pass ran: executor, workers, shards (and how many were resumed)."""
    return {
        "executor": exec_opts.executor,
        "workers": result.extra.get("workers", 1),
        "shard_tokens": exec_opts.shard_tokens,
        "shards": result.shards,
        "shards_resumed": result.shards_resumed,
    }


def executor_metrics(sharded: ShardedPass) -> dict[str, float]:
    """What the executor measured: the merge's seconds; on Ray the actors' start-up (model and SAE
    loaded in every actor), the start or connection of Ray itself, the wall time of the shards alone,
    and the largest actor peak RSS."""
    m = {"time/pass/merge": sharded.merge_seconds}
    for key, name in (("ray_actor_startup_s", "time/ray_actor_startup"), ("ray_shards_wall_s", "time/ray_shards"),
                      ("ray_start_s", "time/ray_start"),
                      ("worker_peak_rss_mib", "memory/worker_peak_rss_mib")):
        if key in sharded.extra:
            m[name] = float(sharded.extra[key])
    return m


def run_quick(
    cfg: AnalysisConfig,
    out: Path | None = None,
    exec_opts: ExecutionOptions | None = None,
    resume: bool = False,
    observer: PassObserver | None = None,
) -> AnalysisResult:
    """Quick analysis: sparsity, dead/rare/dense features, reconstruction, CE/KL ablation; one pass
    in shards, checkpointed under ``out/checkpoint`` (a temporary directory when ``out`` is None;
    the caller removes ``out``'s checkpoint once it has written the outputs)."""
    import tempfile

    exec_opts = exec_opts or ExecutionOptions()
    from sae_mlops.analyses.ray_shards import local_ray_prestarted

    with local_ray_prestarted(exec_opts):  # a local Ray instance starts while the inputs load
        inputs = prepare(cfg)
        with tempfile.TemporaryDirectory(prefix="sae-mlops-quick-") as tmp:
            sharded = run_sharded_pass(inputs, "quick", Path(out) if out is not None else Path(tmp), exec_opts,
                                       resume=resume, observer=observer)
            result = assemble_result("quick", inputs, sharded.stats, sharded.collectors)
            result.params.update(sharding_params(sharded, exec_opts))
            result.metrics.update(executor_metrics(sharded))
    return result
