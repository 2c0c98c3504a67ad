"""Training options, declared once (the `train` command and the MLproject ``train`` entry point are
generated from `TrainConfig` and `TrainRunOptions`; see `sae_mlops.options`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from typing import Any

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from sae_mlops.errors import InputError
from sae_mlops.options import user_errors

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
#: Random baselines of `sae_mlops.training.baselines` (arXiv 2602.14111).
BASELINES = ("frozen-decoder", "soft-frozen-decoder", "frozen-encoder")
#: Other names a baseline is known by: the paper's frozen encoder is the baseline whose activation
#: patterns are random (a random encoder decides which features fire), hence "random-activations".
BASELINE_ALIASES = {"random-activations": "frozen-encoder"}
#: Sparsity penalty when none is given: L1 coefficient (standard), L0 coefficient (jumprelu).
DEFAULT_SPARSITY_COEFFICIENT = {"standard": 5.0, "jumprelu": 1.0}
DEFAULT_TRAINING_TOKENS = 300_000  # about 10 s on the demo model on a laptop CPU
DEMO_HOOK = "blocks.0.hook_resid_post"
#: TrainConfig options that are not part of the recipe (see `TrainConfig.recipe_hash`)
RECIPE_EXCLUDED = ("seed", "log_every")


@user_errors
@dataclass(config=ConfigDict(extra="forbid"))
class TrainConfig:
    """What to train and how (SAELens training classes). Cross-field checks in ``__post_init__``."""

    model: str = Field(
        default="demo", description="Base model: a TransformerLens name, a local Hugging Face checkpoint directory, or 'demo'. (default: demo)"
    )
    corpus: str | None = Field(
        default=None,
        description="Training texts: JSON list of strings, JSONL, Parquet or .txt. (default: the demo corpus with the demo model)",
    )
    text_field: str = Field(default="text", description="Field (JSONL) or column (Parquet) holding the text. (default: text)")
    hook: str | None = Field(
        default=None,
        description="Hook whose activations the SAE reconstructs, e.g. blocks.0.hook_resid_post. "
        "(default: the demo hook with the demo model; required otherwise)",
    )
    architecture: str = Field(
        default="topk",
        description="SAELens training architecture: standard, topk, batchtopk or jumprelu. (default: topk)",
        json_schema_extra={"choices": list(ARCHITECTURES)},
    )
    d_sae: int | None = Field(default=None, ge=1, description="Dictionary size. Unit: features. (default: 8 x the hook's width)")
    k: int = Field(
        default=16, ge=1, description="Active features per token (topk) or per token on average (batchtopk). Unit: features. (default: 16)"
    )
    l1_coefficient: float | None = Field(
        default=None,
        description="Sparsity penalty: L1 coefficient (standard) or L0 coefficient (jumprelu); ignored by topk/batchtopk. "
        "(default: 5.0 / 1.0)",
    )
    lr: float = Field(default=3e-3, gt=0, description="Adam learning rate. (default: 0.003)")
    lr_warm_up_steps: int | None = Field(
        default=None, ge=0, description="Learning-rate warm-up. Unit: steps. (default: 5% of the steps)"
    )
    training_tokens: int = Field(
        default=DEFAULT_TRAINING_TOKENS, ge=1, description=f"Activations to train on. Unit: tokens. (default: {DEFAULT_TRAINING_TOKENS})"
    )
    batch_size_tokens: int = Field(default=1024, ge=1, description="Tokens per training step. Unit: tokens. (default: 1024)")
    context_size: int | None = Field(
        default=None, ge=2, description="Tokens per window. Unit: tokens. (default: min(128, the model's n_ctx))"
    )
    prepend_bos: bool | None = Field(default=None, description="Start windows with BOS. (default: the model's default)")
    store_batch_size_prompts: int = Field(
        default=16, ge=1, description="Windows per forward pass when filling the activation store. Unit: windows. (default: 16)"
    )
    dead_feature_window: int = Field(
        default=100, ge=1, description="Steps without firing after which a feature counts as dead. Unit: steps. (default: 100)"
    )
    feature_sampling_window: int = Field(
        default=200, ge=1, description="Steps per feature-density window (SAELens's sparsity statistics). Unit: steps. (default: 200)"
    )
    seed: int = Field(default=42, description="Random seed. (default: 42)")
    device: str = Field(default="auto", description="Torch device: auto, cpu, cuda, mps. (default: auto)")
    dtype: str = Field(default="float32", description="Model and SAE dtype: float32, float16 or bfloat16. (default: float32)")
    log_every: int = Field(default=1, ge=1, description="Send metrics to MLflow every this many steps. Unit: steps. (default: 1)")
    baseline: str | None = Field(
        default=None,
        description="Train a random baseline (arXiv 2602.14111) instead of a full SAE: frozen-decoder (feature "
        "directions fixed at random), soft-frozen-decoder (kept within cosine 0.8 of random) or frozen-encoder "
        "(activation patterns fixed by a random encoder; also called random-activations); the rest is trained. "
        "(default: none, a normal SAE)",
        json_schema_extra={"choices": [*BASELINES, *BASELINE_ALIASES]},
    )

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """InputError for values that cannot work together (before anything is loaded)."""
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"architecture {self.architecture!r} is not supported; use one of {', '.join(ARCHITECTURES)}."
            )
        self.baseline = BASELINE_ALIASES.get(self.baseline, self.baseline) if self.baseline else self.baseline
        if self.baseline is not None and self.baseline not in BASELINES:
            raise InputError(f"--baseline {self.baseline!r} is not a baseline; use one of {', '.join(BASELINES)}.")
        if self.training_tokens < self.batch_size_tokens:
            raise InputError(
                f"training tokens ({self.training_tokens}) are fewer than one batch ({self.batch_size_tokens}); "
                "raise --training-tokens or lower --batch-size-tokens."
            )
        if self.d_sae is not None and self.architecture in ("topk", "batchtopk") and self.k > self.d_sae:
            raise InputError(f"k ({self.k}) exceeds d_sae ({self.d_sae}); lower --k or raise --d-sae.")

    @property
    def sparsity_coefficient(self) -> float | None:
        if self.architecture not in DEFAULT_SPARSITY_COEFFICIENT:
            return None
        if self.l1_coefficient is not None:
            return float(self.l1_coefficient)
        return DEFAULT_SPARSITY_COEFFICIENT[self.architecture]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def recipe_hash(self) -> str:
        """The recipe's identity: the first 16 hex digits of the SHA-256 of every option except
        `seed` and `log_every` (how often metrics are sent; no effect on the SAE), as canonical JSON
        (sorted keys). Seeds of one recipe share it; any other option change gives another hash.
        Options are hashed as given (``None`` = the default), not as resolved."""
        recipe = {k: v for k, v in self.to_dict().items() if k not in RECIPE_EXCLUDED}
        blob = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def with_seed(self, seed: int) -> TrainConfig:
        """This recipe with another seed."""
        return replace(self, seed=seed)


@user_errors
@dataclass(config=ConfigDict(extra="forbid"))
class TrainRunOptions:
    """Where a trained SAE goes and how the training run is tracked (options of `train`, not of SAELens)."""

    out: str | None = Field(
        default=None, description="Where to save the SAE (SAELens format). (default: saes/<architecture>_<d_sae>_<UTC timestamp>)"
    )
    register: str | None = Field(
        default=None, description="Register the SAE as a new version of this MLflow registered model (created if needed)."
    )
    alias: str | None = Field(default=None, description="Set this alias (e.g. champion) on the registered version; needs --register.")
    experiment: str | None = Field(
        default=None,
        description="MLflow experiment. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)",
        json_schema_extra={"mlproject": False},
    )
    run_name: str | None = Field(
        default=None, description="MLflow run name. (default: train · <model>/<hook> · <architecture> d<d_sae> k<k>)", json_schema_extra={"mlproject": False}
    )
    quiet: bool = Field(
        default=False, description="Only warnings and errors on stderr.", json_schema_extra={"mlproject": False, "short": "-q"}
    )
    seeds: int = Field(
        default=1,
        ge=1,
        description="Train this many seeds of the recipe (--seed, --seed + 1, ...) as child runs of one parent run, "
        "each SAE in <out>/seed-<seed>; tags sae_mlops.recipe_hash and sae_mlops.seed group them. (default: 1: one run)",
    )

    def __post_init__(self) -> None:
        if self.seeds > 1 and self.alias:
            raise InputError(
                f"--alias with --seeds {self.seeds} would move the alias {self.seeds} times; drop --alias and set it "
                "on the seed's version you choose (or let the service's gate do it)."
            )
