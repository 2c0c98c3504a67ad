"""Synthetic worlds with known features, a grid of SAE recipes trained on one, each scored against the truth.

Everything comes from SAELens's ``sae_lens.synthetic`` (the machinery of SynthSAEBench):

- the **world** is a ``SyntheticModel``: ``features`` unit feature directions in ``d_model`` dims
  (``FeatureDictionary``, plus a bias of norm 1), Zipfian firing probabilities between
  ``min_firing_prob`` and ``max_firing_prob`` (exponent ``zipf_exponent``), a low-rank correlation
  between features (``correlation_rank``, ``correlation_scale``), a one-level hierarchy
  (``hierarchy_roots`` parents with ``hierarchy_branching`` children each, a child fires only with its
  parent) and firing magnitudes ~ N(1, ``magnitude_std``). It is saved with ``SyntheticModel.save``
  (config JSON + safetensors) and identified by :func:`world_digest` (sha256 of its config).
- each **recipe** (architecture, d_sae, k or sparsity coefficient, optional random baseline) is a
  SAELens training SAE trained by SAELens's ``SAETrainer`` (the project's
  `sae_mlops.training.trainer.MetricsSAETrainer`, which collects each step's metrics) on
  ``SyntheticActivationIterator`` batches, with ``SyntheticSAERunnerConfig``'s trainer settings;
- each trained SAE is scored by ``eval_sae_on_synthetic_data`` on ``eval_samples`` fresh samples:
  MCC (Hungarian matching of decoder rows to true directions, mean |cosine|), feature uniqueness,
  per-latent precision / recall / F1 / accuracy as a detector of its best-matching true feature, dead
  latents, shrinkage (mean ||x_hat|| / ||x||), explained variance and L0.
  Two proxies SAELens's synthetic eval does not report are computed here on another
  ``eval_samples`` fresh samples (hand-written, two lines of torch): ``synth/mse`` = mean over samples
  of sum_d (x - x_hat)^2 and ``synth/cosine`` = mean over samples of cos(x, x_hat).

Determinism: each recipe sets torch's thread count to ``threads`` and seeds torch with ``seed``
before building its SAE (``seed + 1`` before the eval and ``seed + 2`` before the proxy sample), so
every recipe sees the same evaluation samples and a recipe gives the same numbers wherever it runs
(locally or as a Ray task: :func:`run_grid`). A recipe receives the world as its files' bytes and
returns its SAE as files' bytes, so Ray workers need no shared disk.

Nothing here imports mlflow: :func:`synth_and_log` logs through `sae_mlops.tracking.synth` (as
`sae_mlops.training.run.train_and_log` logs through `sae_mlops.tracking.training`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sae_mlops.config import SynthConfig
from sae_mlops.errors import InputError
from sae_mlops.training.config import BASELINES

log = logging.getLogger(__name__)

#: Our architecture names -> SAELens training architectures.
SYNTH_ARCHITECTURES = {
    "standard": "standard",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "matryoshka": "matryoshka_batchtopk",
}
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")
WORLD_DIR = "world"


@dataclass(frozen=True)
class Recipe:
    """One SAE recipe of the grid."""

    architecture: str
    d_sae: int
    k: int | None = None
    coefficient: float | None = None  # L1 (standard) / L0 (jumprelu) coefficient
    baseline: str | None = None

    @property
    def name(self) -> str:
        # no '.' (MLflow model names refuse it): coefficient 0.2 -> c0p2
        sparsity = f"k{self.k}" if self.k is not None else f"c{self.coefficient:g}".replace(".", "p")
        base = f"{self.architecture}_w{self.d_sae}_{sparsity}"
        return f"{base}_{self.baseline}" if self.baseline else base


@dataclass
class RecipeResult:
    """What training and scoring one recipe gave (picklable: plain types and bytes)."""

    recipe: Recipe
    metrics: dict[str, float]
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # the SAE directory (SAELens format)
    seconds: float = 0.0


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--{option} {text!r} is not a comma-separated list of numbers; give e.g. 8,16.") from None


def _ints(text: str, option: str) -> list[int]:
    values = _floats(text, option)
    if any(v != int(v) or v < 1 for v in values):
        raise InputError(f"--{option} {text!r} must list whole numbers of at least 1; give e.g. 8,16.")
    return [int(v) for v in values]


def parse_grid(cfg: SynthConfig) -> list[Recipe]:
    """The recipes `cfg` asks for: every architecture x width x (k for topk/batchtopk/matryoshka, L1
    coefficient for standard, L0 coefficient for jumprelu), then each baseline of each topk recipe."""
    archs = [a.strip() for a in cfg.architectures.split(",") if a.strip()]
    bad = [a for a in archs if a not in SYNTH_ARCHITECTURES]
    if bad or not archs:
        raise InputError(
            f"--architectures {cfg.architectures!r} names {', '.join(bad) or 'nothing'}; use some of {', '.join(SYNTH_ARCHITECTURES)}."
        )
    widths = _ints(cfg.widths, "widths")
    ks = _ints(cfg.k_values, "k-values")
    coefficients = {"standard": _floats(cfg.l1_coefficients, "l1-coefficients"),
                    "jumprelu": _floats(cfg.l0_coefficients, "l0-coefficients")}
    baselines = [b.strip() for b in cfg.baselines.split(",") if b.strip() and b.strip() != "none"]
    if [b for b in baselines if b not in BASELINES]:
        raise InputError(f"--baselines {cfg.baselines!r}: use some of {', '.join(BASELINES)} (or nothing).")
    if not widths:
        raise InputError("--widths lists no width; give e.g. 512,1024.")
    recipes: list[Recipe] = []
    for arch in archs:
        for width in widths:
            if arch in K_ARCHITECTURES:
                for k in ks:
                    if k > width:
                        raise InputError(f"k {k} exceeds width {width}; lower --k-values or raise --widths.")
                    recipes.append(Recipe(arch, width, k=k))
            else:
                option = "l1-coefficients" if arch == "standard" else "l0-coefficients"
                if not coefficients[arch]:
                    raise InputError(f"--{option} lists nothing; give e.g. 0.2,0.5.")
                recipes += [Recipe(arch, width, coefficient=c) for c in coefficients[arch]]
    recipes += [Recipe(r.architecture, r.d_sae, r.k, r.coefficient, b) for b in baselines for r in list(recipes) if r.architecture == "topk"]
    return recipes


# --- the world ---------------------------------------------------------------------------------


def world_model_config(cfg: SynthConfig) -> Any:
    """The ``sae_lens.synthetic.SyntheticModelConfig`` of `cfg`'s world."""
    from sae_lens.synthetic import HierarchyConfig, ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig, SyntheticModelConfig

    return SyntheticModelConfig(
        num_features=cfg.features,
        hidden_dim=cfg.d_model,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=cfg.zipf_exponent, max_prob=cfg.max_firing_prob, min_prob=cfg.min_firing_prob
        ),
        hierarchy=HierarchyConfig(total_root_nodes=cfg.hierarchy_roots, branching_factor=cfg.hierarchy_branching, max_depth=1)
        if cfg.hierarchy_roots > 0
        else None,
        correlation=LowRankCorrelationConfig(rank=cfg.correlation_rank, correlation_scale=cfg.correlation_scale, seed=cfg.world_seed)
        if cfg.correlation_rank > 0
        else None,
        std_firing_magnitudes=cfg.magnitude_std,
        mean_firing_magnitudes=1.0,
        seed=cfg.world_seed,
    )


def world_digest(model_cfg: Any) -> str:
    """sha256 (first 16 hex digits) of the world config's canonical JSON: equal digests, equal worlds."""
    text = json.dumps(model_cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_world(cfg: SynthConfig, directory: Path) -> str:
    """Build `cfg`'s world and save it (``SyntheticModel.save``) into `directory`; returns its digest."""
    from sae_lens.synthetic import SyntheticModel

    model_cfg = world_model_config(cfg)
    t0 = time.perf_counter()
    world = SyntheticModel(model_cfg, device="cpu")
    world.save(directory)
    log.info("built world %s (%d features in %d dims) in %.1fs", world_digest(model_cfg), cfg.features, cfg.d_model, time.perf_counter() - t0)
    return world_digest(model_cfg)


def world_files(directory: Path) -> dict[str, bytes]:
    """The saved world's files (name -> bytes)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def load_world(files: dict[str, bytes] | Path, device: str = "cpu") -> Any:
    """A ``SyntheticModel`` from its saved files (bytes or a directory)."""
    from sae_lens.synthetic import SyntheticModel

    if isinstance(files, Path):
        return SyntheticModel.load_from_disk(files, device=device)
    with tempfile.TemporaryDirectory(prefix="sae-mlops-world-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return SyntheticModel.load_from_disk(tmp, device=device)


# --- one recipe --------------------------------------------------------------------------------


def _training_sae(recipe: Recipe, d_in: int, device: str) -> Any:
    from sae_lens.registry import get_sae_training_class

    arch = SYNTH_ARCHITECTURES[recipe.architecture]
    sae_cls, cfg_cls = get_sae_training_class(arch)
    kw: dict[str, Any] = {"d_in": d_in, "d_sae": recipe.d_sae, "device": device, "dtype": "float32"}
    if recipe.architecture in K_ARCHITECTURES:
        kw["k"] = recipe.k
    if recipe.architecture == "matryoshka":  # nested levels: a quarter, a half, the whole dictionary
        kw["matryoshka_widths"] = sorted({max(1, recipe.d_sae // 4), max(1, recipe.d_sae // 2), recipe.d_sae})
    if recipe.architecture == "standard":
        kw["l1_coefficient"] = recipe.coefficient
    if recipe.architecture == "jumprelu":
        kw["l0_coefficient"] = recipe.coefficient
    return sae_cls(cfg_cls(**kw))


def proxy_metrics(sae: Any, world: Any, samples: int, batch_size: int) -> dict[str, float]:
    """``synth/mse`` (mean over samples of sum_d (x - x_hat)^2) and ``synth/cosine`` (mean cos(x, x_hat))
    on `samples` fresh samples of `world` (torch's global RNG: seed it first)."""
    import torch

    se = cos = 0.0
    done = 0
    with torch.no_grad():
        while done < samples:
            n = min(batch_size, samples - done)
            x = world.sample(n)
            x_hat = sae.decode(sae.encode(x))
            se += float(((x - x_hat) ** 2).sum(dim=-1).double().sum())
            cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).double().sum())
            done += n
    return {"synth/mse": se / samples, "synth/cosine": cos / samples}


def ground_truth_metrics(sae: Any, world: Any, samples: int, batch_size: int) -> dict[str, float]:
    """SAELens's ``eval_sae_on_synthetic_data`` as ``synth/*`` metrics (see the module docstring)."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    r = eval_sae_on_synthetic_data(
        sae=sae, feature_dict=world.feature_dict, activations_generator=world.activation_generator,
        num_samples=samples, batch_size=batch_size,
    )
    d_sae = int(sae.W_dec.shape[0])
    return {
        "synth/mcc": float(r.mcc),
        "synth/uniqueness": float(r.uniqueness),
        "synth/f1": float(r.classification.f1_score),
        "synth/precision": float(r.classification.precision),
        "synth/recall": float(r.classification.recall),
        "synth/accuracy": float(r.classification.accuracy),
        "synth/dead_latents": float(r.dead_latents),
        "synth/dead_fraction": float(r.dead_latents) / d_sae,
        "synth/shrinkage": float(r.shrinkage),
        "synth/explained_variance": float(r.explained_variance),
        "synth/l0": float(r.sae_l0),
        "synth/true_l0": float(r.true_l0),
    }


def score_sae(sae: Any, world: Any, samples: int, batch_size: int, seed: int) -> dict[str, float]:
    """Ground-truth metrics (seeded `seed + 1`) and the two extra proxies (seeded `seed + 2`)."""
    import torch

    torch.manual_seed(seed + 1)
    metrics = ground_truth_metrics(sae, world, samples, batch_size)
    torch.manual_seed(seed + 2)
    metrics.update(proxy_metrics(sae, world, samples, batch_size))
    return metrics


def train_recipe(world: dict[str, bytes], recipe: Recipe, settings: dict[str, Any]) -> RecipeResult:
    """Train and score one recipe on the world given as saved files; `settings`: training_samples,
    batch_size, lr, eval_samples, seed, threads, device, log_every, world_digest."""
    import torch
    from sae_lens import LoggingConfig
    from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunnerConfig
    from sae_lens.synthetic.training import SyntheticActivationIterator

    from sae_mlops.training.baselines import apply_baseline, frozen_change
    from sae_mlops.training.trainer import MetricsSAETrainer

    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(settings["threads"]))
    t0 = time.perf_counter()
    try:
        device = settings["device"]
        model = load_world(world, device=device)
        seed = int(settings["seed"])
        torch.manual_seed(seed)
        sae = _training_sae(recipe, model.cfg.hidden_dim, device)
        baseline = apply_baseline(sae, recipe.baseline)
        runner_cfg = SyntheticSAERunnerConfig(
            synthetic_model=model.cfg,
            sae=sae.cfg,
            training_samples=int(settings["training_samples"]),
            batch_size=int(settings["batch_size"]),
            lr=float(settings["lr"]),
            device=device,
            checkpoint_path=None,
            output_path=None,
            dead_feature_window=100,
            feature_sampling_window=200,
            n_batches_for_norm_estimate=10,
            logger=LoggingConfig(log_to_wandb=False),
        )
        history: list[tuple[int, dict[str, float]]] = []
        trainer = MetricsSAETrainer(
            cfg=runner_cfg.to_sae_trainer_config(),
            sae=sae,
            data_provider=SyntheticActivationIterator(model.feature_dict, model.activation_generator, runner_cfg.batch_size),
            evaluator=None,
            save_checkpoint_fn=lambda _path: None,
            on_metrics=lambda step, m: history.append((int(step), dict(m))),
            log_every=int(settings["log_every"]),
            baseline=baseline,
        )
        model.feature_dict.eval()
        trainer.fit()
        train_seconds = time.perf_counter() - t0
        metrics = score_sae(sae, model, int(settings["eval_samples"]), max(int(settings["batch_size"]), 4096), seed)
        metrics["synth/train_loss"] = float(trainer.last_metrics.get("train/loss", float("nan")))
        metrics["synth/train_seconds"] = train_seconds
        change = frozen_change(sae, baseline)
        if change is not None:
            metrics["synth/baseline_frozen_change"] = change
        sae.cfg.metadata.model_name = "synthetic"
        sae.cfg.metadata.hook_name = f"synthetic.world_{settings.get('world_digest', 'unknown')}"
        with tempfile.TemporaryDirectory(prefix="sae-mlops-synth-sae-") as tmp:
            sae.save_inference_model(tmp)
            files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t0
    log.info("recipe %s: MCC %.3f, F1 %.3f, explained variance %.3f (%.1fs)", recipe.name, metrics["synth/mcc"],
             metrics["synth/f1"], metrics["synth/explained_variance"], seconds)
    return RecipeResult(recipe=recipe, metrics=metrics, history=history, files=files, seconds=seconds)


def recipe_settings(cfg: SynthConfig, digest: str) -> dict[str, Any]:
    """The training settings a recipe needs (see :func:`train_recipe`)."""
    keys = ("training_samples", "batch_size", "lr", "eval_samples", "seed", "threads", "device", "log_every")
    return {**{k: getattr(cfg, k) for k in keys}, "world_digest": digest}


# --- the grid ----------------------------------------------------------------------------------


def run_grid(cfg: SynthConfig, world: dict[str, bytes], recipes: list[Recipe], digest: str) -> list[RecipeResult]:
    """Train and score every recipe, here one after another (``executor local``) or as one Ray task
    each (``executor ray``; results in recipe order). Same numbers either way (module docstring)."""
    settings = recipe_settings(cfg, digest)
    if cfg.executor == "local":
        results = []
        for i, recipe in enumerate(recipes, 1):
            log.info("recipe %d/%d: %s", i, len(recipes), recipe.name)
            results.append(train_recipe(world, recipe, settings))
        return results
    return _run_on_ray(cfg, world, recipes, settings)


def _run_on_ray(cfg: SynthConfig, world: dict[str, bytes], recipes: list[Recipe], settings: dict[str, Any]) -> list[RecipeResult]:
    """One Ray task per recipe (``num_cpus = threads``). Uses an initialised Ray, else connects to
    ``ray_address``, else starts a local instance on 127.0.0.1 and stops it at the end."""
    import ray

    from sae_mlops.analyses.ray_shards import bind_ray_to_loopback, restore_env, stop_local_ray

    started = False
    previous_env: dict[str, str | None] | None = None
    if not ray.is_initialized():
        try:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                previous_env = bind_ray_to_loopback()  # loopback only, workers not niced (LOCAL_RAY_ENV)
                ray.init(
                    num_cpus=max(cfg.threads, os.cpu_count() or 1),
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_pythonpath())}},
                )
                started = True
        except ConnectionError as exc:
            if previous_env is not None:
                restore_env(previous_env)
            raise InputError(f"--ray-address {cfg.ray_address}: no Ray cluster answered ({exc}); start one or drop the option.") from None
    try:
        task = ray.remote(num_cpus=cfg.threads)(train_recipe)
        world_ref = ray.put(world)
        futures = [task.remote(world_ref, recipe, settings) for recipe in recipes]
        results = []
        for recipe, future in zip(recipes, futures, strict=True):
            results.append(ray.get(future))
            log.info("recipe %s done on Ray", recipe.name)
        return results
    finally:
        if started:
            stop_local_ray()
        if previous_env is not None:
            restore_env(previous_env)


def _pythonpath() -> list[str]:
    """Where this package is imported from, for the workers of a Ray instance started here."""
    import sae_mlops

    root = str(Path(sae_mlops.__file__).resolve().parents[1])
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [root, *[p for p in extra if p != root]]


def write_sae(result: RecipeResult, directory: Path) -> Path:
    """Write a recipe's SAE files into `directory` (a SAELens directory the project's loader reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in result.files.items():
        (directory / name).write_bytes(data)
    return directory


def recipe_params(recipe: Recipe) -> dict[str, Any]:
    """A recipe as flat params."""
    return {f"recipe.{k}": v for k, v in asdict(recipe).items()} | {"recipe": recipe.name}


# --- build or reuse the world, run the grid, log it, report ------------------------------------


@dataclass
class SynthOutcome:
    """What `synth_and_log` did."""

    out: Path
    digest: str
    world_run_id: str
    world_reused: bool
    grid_run_id: str
    recipe_run_ids: dict[str, str]
    table: Any  # pandas DataFrame: one row per recipe
    facts: dict[str, Any]
    report: Path
    seconds: float


def results_table(results: list[RecipeResult]) -> Any:
    """One row per recipe (index: recipe name): its metrics plus architecture, d_sae, k, coefficient, baseline."""
    import pandas as pd

    rows = {r.recipe.name: {**asdict(r.recipe), **r.metrics} for r in results}
    return pd.DataFrame.from_dict(rows, orient="index")


def synth_and_log(cfg: SynthConfig, out: str | Path | None = None, experiment: str | None = None) -> SynthOutcome:
    """Build (or reuse, by digest) the world of `cfg`, train and score its grid (`run_grid`), log the
    world, the grid run and one child training run per recipe to MLflow (`sae_mlops.tracking.synth`),
    and write and log the synth report (`sae_mlops.training.synth_report`). Files under `out`:
    ``world/``, ``saes/<recipe>/`` (SAELens directories), ``report/``."""
    from datetime import datetime, timezone

    from sae_mlops.sources.hashing import sha256_directory
    from sae_mlops.tracking import synth as tracking
    from sae_mlops.training.synth_report import write_report

    t0 = time.perf_counter()
    recipes = parse_grid(cfg)  # bad options stop here, before anything is built or logged
    root = Path(out) if out else Path("synth") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InputError(f"output directory {root} already exists and is not empty; choose another --out.")
    root.mkdir(parents=True, exist_ok=True)
    digest = world_digest(world_model_config(cfg))
    world_run = tracking.find_world(digest)
    reused = world_run is not None
    if world_run is not None:
        world_dir = tracking.download_world(world_run, root)
        log.info("reusing world %s from run %s", digest, world_run)
    else:
        world_dir = root / WORLD_DIR
        build_world(cfg, world_dir)
        world_params = {k: v for k, v in cfg.to_dict().items() if k in _WORLD_OPTIONS}
        world_run = tracking.log_world(world_dir, digest, world_params, experiment)
    world = world_files(world_dir)
    world_tags = {tracking.TAG_WORLD_DIGEST: digest, tracking.TAG_WORLD_RUN: world_run}
    name = f"synth · world {digest} · {len(recipes)} recipes"
    run_ids: dict[str, str] = {}
    with tracking.GridRun(experiment, name) as grid:
        grid.set_tags(world_tags)
        grid.log_params({**cfg.to_dict(), "recipes": len(recipes), "world_digest": digest})
        results = run_grid(cfg, world, recipes, digest)
        for res in results:
            sae_dir = write_sae(res, root / "saes" / res.recipe.name)
            r = res.recipe
            tags = {**world_tags, tracking.TAG_RECIPE: r.name, tracking.TAG_BASELINE: r.baseline}
            run_ids[r.name] = grid.log_recipe(
                name=f"synth · {r.name}",
                params={**recipe_params(r), **recipe_settings(cfg, digest), "d_in": cfg.d_model, "sae_dir": str(sae_dir)},
                tags=tags,
                history=res.history,
                metrics=res.metrics,
                sae_dir=sae_dir,
                sae_hash=sha256_directory(sae_dir),
                model_params={"architecture": r.architecture, "d_in": cfg.d_model, "d_sae": r.d_sae, "k": r.k,
                              "sparsity_coefficient": r.coefficient, "baseline": r.baseline, "model": "synthetic",
                              "world_digest": digest, "sae_format": "saelens"},
                architecture=r.architecture,
            )
        table = results_table(results)
        seconds = time.perf_counter() - t0
        world_facts = {"digest": digest, **{k: getattr(cfg, k) for k in ("features", "d_model", "world_seed")}}
        _files, metrics, facts = write_report(table, root / "report", world=world_facts, resamples=cfg.bootstrap_resamples,
                                              seed=cfg.seed, seconds=seconds)
        grid.log_metrics({**metrics, "synth/recipes": float(len(recipes)), "synth/grid_seconds": seconds})
        grid.log_report(root / "report")
        grid.set_tags({tracking.TAG_WINNER: facts["winner_mcc"]})
        grid_id = grid.run_id
    return SynthOutcome(root, digest, world_run, reused, grid_id, run_ids, table, facts, root / "report", time.perf_counter() - t0)


_WORLD_OPTIONS = ("features", "d_model", "world_seed", "zipf_exponent", "max_firing_prob", "min_firing_prob",
                  "correlation_rank", "correlation_scale", "hierarchy_roots", "hierarchy_branching", "magnitude_std")
