"""Train an SAE with SAELens (:func:`train_sae`), and record it as an MLflow source run (:func:`train_and_log`).

:func:`train_sae` resolves the model and corpus with `sae_mlops.sources` (the demo, a local checkpoint
or a TransformerLens name; JSON/JSONL/Parquet/text), checks the hook, builds SAELens's
``LanguageModelSAERunnerConfig`` (W&B off, no checkpoints) with the corpus as a Hugging Face
``datasets.Dataset`` and the loaded model as overrides, trains with
`sae_mlops.training.trainer.CallbackTrainingRunner`, and saves the final SAE with SAELens's
``save_final_sae`` (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``,
``runner_cfg.json``) into a temporary directory beside `out_dir`, renamed to `out_dir` when complete.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sae_mlops.errors import InputError
from sae_mlops.training.config import DEMO_HOOK, TrainConfig
from sae_mlops.training.trainer import MetricsCallback

log = logging.getLogger(__name__)

DEFAULT_SAE_ROOT = Path("saes")
#: A random baseline's fixed tensors at initialisation (safetensors, parameter names as keys).
BASELINE_INIT_FILE = "baseline_init.safetensors"


@dataclass
class TrainResult:
    sae_dir: Path
    sae_hash: str
    params: dict[str, Any]  # the config plus every resolved value
    summary: dict[str, float]  # final metrics (train/final_*, train/tokens, train/steps, train/seconds)
    model_params: dict[str, Any] = field(default_factory=dict)  # describe the SAE (logged model params)
    corpus_path: str = ""
    corpus_digest: str | None = None
    corpus_documents: int = 0


def default_out_dir(cfg: TrainConfig) -> Path:
    ts = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suffix = f"_{cfg.baseline}" if cfg.baseline else ""
    return DEFAULT_SAE_ROOT / f"{cfg.architecture}_{cfg.d_sae or 'auto'}{suffix}_{ts}"


def _sae_config(cfg: TrainConfig, d_in: int, d_sae: int, dtype: str, device: str):
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    common = {"d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": device}
    if cfg.architecture == "standard":
        return StandardTrainingSAEConfig(**common, l1_coefficient=cfg.sparsity_coefficient)
    if cfg.architecture == "topk":
        return TopKTrainingSAEConfig(**common, k=cfg.k)
    if cfg.architecture == "batchtopk":
        return BatchTopKTrainingSAEConfig(**common, k=cfg.k)
    return JumpReLUTrainingSAEConfig(**common, l0_coefficient=cfg.sparsity_coefficient)


@dataclass
class TrainingInputs:
    """Everything resolved and checked before training starts (see :func:`prepare_training`)."""

    cfg: TrainConfig
    out: Path
    device: str
    model: Any  # LoadedModel
    corpus: Any  # Corpus
    hook: str
    context_size: int
    prepend_bos: bool
    d_in: int
    d_sae: int


def prepare_training(cfg: TrainConfig, out_dir: Path | str | None = None) -> TrainingInputs:
    """Check `cfg`, load the model and corpus, check the hook and sizes: every InputError a training
    run can raise is raised here, before anything is trained or logged."""
    from sae_mlops.sources.device import resolve_device

    cfg.check()
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output directory {out} already exists and is not empty; choose another --out.")
    device = resolve_device(cfg.device)
    model, corpus, hook, context_size, prepend_bos = _inputs(cfg, device)
    d_in = _hook_width(model, hook)
    d_sae = int(cfg.d_sae or 8 * d_in)
    if cfg.architecture in ("topk", "batchtopk") and cfg.k > d_sae:
        raise InputError(f"k ({cfg.k}) exceeds d_sae ({d_sae}); lower --k or raise --d-sae.")
    return TrainingInputs(cfg, out, device, model, corpus, hook, context_size, prepend_bos, d_in, d_sae)


def train_sae(
    cfg: TrainConfig,
    out_dir: Path | str | None = None,
    on_metrics: MetricsCallback | None = None,
    prepared: TrainingInputs | None = None,
) -> TrainResult:
    """Train an SAE as `cfg` says; metrics go to `on_metrics(step, metrics)`; the SAE to `out_dir`.
    `prepared`: the result of :func:`prepare_training` (else it is called here)."""
    from sae_mlops.sources.hashing import sha256_directory

    inputs = prepared or prepare_training(cfg, out_dir)
    cfg, out, device, model, corpus = inputs.cfg, inputs.out, inputs.device, inputs.model, inputs.corpus
    hook, context_size, prepend_bos, d_in, d_sae = (
        inputs.hook, inputs.context_size, inputs.prepend_bos, inputs.d_in, inputs.d_sae,
    )
    steps = math.ceil(cfg.training_tokens / cfg.batch_size_tokens)
    warm_up = cfg.lr_warm_up_steps if cfg.lr_warm_up_steps is not None else steps // 20

    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    from sae_mlops.training.trainer import CallbackTrainingRunner

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    # The activation buffer holds n_batches_in_buffer * context_size tokens and must hold a batch.
    n_batches_in_buffer = max(20, math.ceil(2 * cfg.batch_size_tokens / context_size))
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=_sae_config(cfg, d_in, d_sae, cfg.dtype, device),
        model_name=cfg.model,
        hook_name=hook,
        dataset_path=str(corpus.path),
        model_from_pretrained_kwargs={},
        is_dataset_tokenized=False,
        streaming=False,
        context_size=context_size,
        prepend_bos=prepend_bos,
        exclude_special_tokens=True,
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.batch_size_tokens,
        store_batch_size_prompts=cfg.store_batch_size_prompts,
        n_batches_in_buffer=n_batches_in_buffer,
        lr=cfg.lr,
        lr_warm_up_steps=warm_up,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window,
        n_batches_for_norm_estimate=min(100, max(1, steps)),
        seed=cfg.seed,
        device=device,
        dtype=cfg.dtype,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=str(tmp),
        verbose=False,
    )
    import torch

    torch.manual_seed(cfg.seed)
    dataset = Dataset.from_dict({"text": corpus.texts})
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), _quiet_saelens_overrides():
            warnings.simplefilter("ignore", UserWarning)
            runner = CallbackTrainingRunner(
                runner_cfg,
                override_dataset=dataset,
                override_model=model.model,
                on_metrics=on_metrics,
                log_every=cfg.log_every,
                baseline=cfg.baseline,
            )
            sae = runner.run()
            if runner.baseline is not None:  # the random initial values of the fixed part, beside the SAE
                from safetensors.torch import save_file

                save_file(runner.baseline.frozen_tensors(), str(tmp / BASELINE_INIT_FILE))
        seconds = time.perf_counter() - t0
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trainer = runner.trainer
    assert trainer is not None
    meta = sae.cfg.metadata
    summary = {
        "train/final_l0": getattr(meta, "l0", None),
        "train/final_dead_features": getattr(meta, "num_dead_features", None),
        "train/tokens": float(trainer.n_training_samples),
        "train/steps": float(trainer.n_training_steps),
        "train/seconds": seconds,
        "train/tokens_per_s": trainer.n_training_samples / seconds if seconds > 0 else None,
    }
    if runner.baseline is not None:
        from sae_mlops.training.baselines import frozen_change

        summary["train/baseline_frozen_change"] = frozen_change(sae, runner.baseline)
    for key in ("train/loss", "train/mse", "train/explained_variance"):
        if key in trainer.last_metrics:
            summary[key.replace("train/", "train/final_", 1)] = trainer.last_metrics[key]
    summary_f: dict[str, float] = {k: float(v) for k, v in summary.items() if v is not None}
    import sae_lens

    params = {
        **cfg.to_dict(),
        "corpus": corpus.path,
        "corpus_format": corpus.format,
        "corpus_digest": corpus.digest,
        "corpus_documents": len(corpus.texts),
        "hook": hook,
        "d_in": d_in,
        "d_sae": d_sae,
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "l1_coefficient": cfg.sparsity_coefficient,
        "lr_warm_up_steps": warm_up,
        "training_steps": steps,
        "n_batches_in_buffer": n_batches_in_buffer,
        "device": device,
        "trainer": "sae_lens.LanguageModelSAETrainingRunner+MetricsSAETrainer",
        "version_sae_lens": sae_lens.__version__,
        "version_torch": torch.__version__,
        "sae_dir": str(out),
    }
    model_params = {
        "architecture": cfg.architecture,
        "inference_architecture": sae.cfg.architecture() if hasattr(sae.cfg, "architecture") else cfg.architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": cfg.k if cfg.architecture in ("topk", "batchtopk") else None,
        "l1_coefficient": cfg.sparsity_coefficient,
        "hook": hook,
        "model": cfg.model,
        "context_size": context_size,
        "training_tokens": trainer.n_training_samples,
        "sae_format": "saelens",
        "baseline": cfg.baseline,
    }
    sae_hash = sha256_directory(out)
    log.info("Trained %s SAE (d_sae=%d) in %.1fs; saved to %s", cfg.architecture, d_sae, seconds, out)
    return TrainResult(
        sae_dir=out,
        sae_hash=sae_hash,
        params=params,
        summary=summary_f,
        model_params=model_params,
        corpus_path=corpus.path,
        corpus_digest=corpus.digest,
        corpus_documents=len(corpus.texts),
    )


def train_and_log(
    cfg: TrainConfig,
    out_dir: Path | str | None = None,
    *,
    register: str | None = None,
    alias: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
):
    """Train (:func:`train_sae`) inside an MLflow source run: params, per-step metrics, the corpus as
    a dataset input, the SAE as artifacts and as a LoggedModel, optionally registered (+ alias).
    Returns `sae_mlops.tracking.training.SourceOutcome`."""
    from sae_mlops.tracking.registry import check_model_name
    from sae_mlops.tracking.training import TAG_BASELINE, SourceRun

    check_model_name(register, alias)
    prepared = prepare_training(cfg, out_dir)  # bad input stops here, before a run exists
    from sae_mlops.naming import run_title

    k = cfg.k if cfg.architecture in ("topk", "batchtopk") else None
    # train · <model>/<hook> · <architecture> d<d_sae> k<k> (the output directory name carries a timestamp)
    name = run_name or run_title("train", f"{cfg.model}/{prepared.hook}", cfg.architecture, prepared.d_sae, k)
    if cfg.baseline:
        name = f"{name} · baseline {cfg.baseline}" if not run_name else name
    with SourceRun("train", experiment=experiment, run_name=name) as run:
        run.set_tags(_seed_tags(cfg))
        if cfg.baseline:
            run.set_tags({TAG_BASELINE: cfg.baseline})
        return _train_in(run, prepared, register, alias)


def _seed_tags(cfg: TrainConfig) -> dict[str, Any]:
    from sae_mlops.tracking.training import TAG_RECIPE_HASH, TAG_SEED

    return {TAG_RECIPE_HASH: cfg.recipe_hash(), TAG_SEED: cfg.seed}


def _train_in(run: Any, prepared: TrainingInputs, register: str | None, alias: str | None):
    """Train `prepared` inside the open source run `run`; returns its SourceOutcome."""
    cfg = prepared.cfg
    run.log_params(cfg.to_dict())
    result = train_sae(cfg, on_metrics=run.log_metrics, prepared=prepared)
    run.log_params(result.params)  # resolved values differing from the given ones: resolved.<name>
    run.log_corpus(result.corpus_path, result.corpus_digest, result.corpus_documents)
    return run.finish_with_sae(
        result.sae_dir,
        result.sae_hash,
        model_params=result.model_params,
        architecture=cfg.architecture,
        summary=result.summary,
        register=register,
        alias=alias,
    )


@dataclass
class SeedsOutcome:
    """``train --seeds N``: the parent run, the recipe hash and each seed's SourceOutcome (seed order)."""

    parent_run_id: str
    recipe_hash: str
    seeds: list[int]
    outcomes: list[Any]  # sae_mlops.tracking.training.SourceOutcome
    metrics: dict[str, float] = field(default_factory=dict)  # <final metric>_seed_mean / _seed_std


def seed_list(cfg: TrainConfig, seeds: int) -> list[int]:
    """The seeds of ``--seeds N``: ``cfg.seed``, ``cfg.seed + 1``, ..., ``cfg.seed + N - 1``."""
    return [cfg.seed + i for i in range(seeds)]


def train_seeds_and_log(
    cfg: TrainConfig,
    seeds: int,
    out_dir: Path | str | None = None,
    *,
    register: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
) -> SeedsOutcome:
    """Train `seeds` seeds of the recipe `cfg` (:func:`seed_list`) as child runs of one parent run.

    Every child is a normal training run (:func:`train_and_log`'s params, metrics, lineage, logged
    model, registration under `register`), named ``<name> · seed <s>`` and tagged
    ``sae_mlops.recipe_hash`` (`TrainConfig.recipe_hash`, equal across the seeds) and
    ``sae_mlops.seed``; its SAE goes to ``<out>/seed-<s>``. The parent (kind ``train_seeds``) holds the
    recipe's params, the same recipe hash, and each final metric's seed mean and std. The model and
    corpus are loaded once; every output directory is checked before the first seed trains.
    """
    from sae_mlops.naming import run_title
    from sae_mlops.tracking.registry import check_model_name
    from sae_mlops.tracking.training import SeedsRun

    check_model_name(register, None)
    base = Path(out_dir) if out_dir else default_out_dir(cfg)
    values = seed_list(cfg, seeds)
    first = prepare_training(cfg.with_seed(values[0]), base / f"seed-{values[0]}")
    prepared = [first]
    for s in values[1:]:
        out = base / f"seed-{s}"
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InputError(f"output directory {out} already exists and is not empty; choose another --out.")
        prepared.append(replace(first, cfg=cfg.with_seed(s), out=out))
    k = cfg.k if cfg.architecture in ("topk", "batchtopk") else None
    name = run_name or run_title("train", f"{cfg.model}/{first.hook}", cfg.architecture, first.d_sae, k)
    outcomes: list[Any] = []
    with SeedsRun(cfg.recipe_hash(), values, experiment=experiment, run_name=f"{name} · {seeds} seeds") as parent:
        parent.log_params({key: v for key, v in cfg.to_dict().items() if key != "seed"} | {"seeds": seeds, "first_seed": values[0]})
        for s, inputs in zip(values, prepared, strict=True):
            log.info("Training seed %d (%d of %d)", s, len(outcomes) + 1, seeds)
            with parent.child("train", s, f"{name} · seed {s}") as run:
                outcomes.append(_train_in(run, inputs, register, None))
        metrics = parent.finish(outcomes)
    return SeedsOutcome(parent.run_id, cfg.recipe_hash(), values, outcomes, metrics)


# --- inputs ------------------------------------------------------------------------------------------


def _inputs(cfg: TrainConfig, device: str):
    from sae_mlops.sources.corpus import load_corpus
    from sae_mlops.sources.model import load_model

    corpus_path = cfg.corpus or ("demo" if cfg.model == "demo" else None)
    if corpus_path is None:
        raise InputError("no corpus given; pass --corpus (JSON list of strings, JSONL, Parquet or .txt).")
    hook = cfg.hook or (DEMO_HOOK if cfg.model == "demo" else None)
    if hook is None:
        raise InputError(f"no hook given for model {cfg.model}; pass --hook, e.g. blocks.0.hook_resid_post.")
    corpus = load_corpus(corpus_path, text_field=cfg.text_field)
    # Loaded as the analysis loads it (sources.load_model defaults), and recorded in the SAE's metadata
    # as model_from_pretrained_kwargs={} so that analysis sees the same activations.
    model = load_model(cfg.model, device=device, dtype=cfg.dtype)
    if hook not in model.model.hook_dict:
        import difflib

        close = difflib.get_close_matches(hook, list(model.model.hook_dict), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"model {cfg.model} has no hook {hook!r}{hint}; pass an existing --hook.")
    n_ctx = int(model.model.cfg.n_ctx)
    context_size = int(cfg.context_size or min(128, n_ctx))
    if context_size > n_ctx:
        raise InputError(f"context size {context_size} exceeds the model's n_ctx {n_ctx}; pass --context-size {n_ctx} or less.")
    if context_size < 2:
        raise InputError(f"context size {context_size} is too small; pass --context-size 2 or more.")
    prepend_bos = cfg.prepend_bos
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.model.cfg, "default_prepend_bos", True))
    return model, corpus, hook, context_size, prepend_bos


def _hook_width(model: Any, hook: str) -> int:
    import torch

    tokens = torch.tensor([[0, 0]], device=next(model.model.parameters()).device)
    _, cache = model.model.run_with_cache(tokens, names_filter=[hook])
    act = cache[hook]
    if act.ndim != 3:
        raise InputError(
            f"hook {hook} gives per-head activations; train on a [batch, position, width] hook such as "
            "blocks.0.hook_resid_post."
        )
    return int(act.shape[-1])


class _quiet_saelens_overrides:
    """SAELens warns that overriding the model/dataset makes the run not reproducible from its config
    alone; here the MLflow run records both (params + dataset input), so that warning is noise."""

    def __enter__(self):
        self._logger = logging.getLogger("sae_lens")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)

