"""Training configuration (shared by the CLI, the MLproject ``train`` entry point and tests)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sae_mlops.errors import InputError

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
#: Sparsity penalty when none is given: L1 coefficient (standard), L0 coefficient (jumprelu).
DEFAULT_SPARSITY_COEFFICIENT = {"standard": 5.0, "jumprelu": 1.0}
DEFAULT_TRAINING_TOKENS = 300_000  # about 10 s on the demo model on a laptop CPU
DEMO_HOOK = "blocks.0.hook_resid_post"


@dataclass
class TrainConfig:
    """What to train and how.

    model: TransformerLens name, local Hugging Face checkpoint directory, or ``demo``.
    corpus: JSON/JSONL/Parquet/text file; None with the demo model: the demo corpus.
    hook: TransformerLens hook whose activations the SAE reconstructs (None: the demo hook for the
        demo model; required otherwise).
    architecture: standard | topk | batchtopk | jumprelu (SAELens training classes).
    d_sae: dictionary size (None: 8 x the hook's width).
    k: active features per token (topk) or on average per token (batchtopk).
    l1_coefficient: sparsity penalty: L1 coefficient for standard, L0 coefficient for jumprelu
        (None: 5.0 / 1.0); ignored by topk/batchtopk.
    training_tokens: activations (tokens) to train on. batch_size_tokens: tokens per step.
    context_size: tokens per window (None: min(128, the model's n_ctx)).
    prepend_bos: start windows with BOS (None: the model's default).
    dead_feature_window: steps without firing after which a feature counts as dead.
    feature_sampling_window: steps per feature-density window (SAELens's sparsity statistics).
    lr, lr_warm_up_steps (None: 5% of the steps), seed, device ("auto", "cpu", "cuda"...), dtype.
    log_every: send metrics every this many steps.
    """

    model: str = "demo"
    corpus: str | None = None
    text_field: str = "text"
    hook: str | None = None
    architecture: str = "topk"
    d_sae: int | None = None
    k: int = 16
    l1_coefficient: float | None = None
    lr: float = 3e-3
    lr_warm_up_steps: int | None = None
    training_tokens: int = DEFAULT_TRAINING_TOKENS
    batch_size_tokens: int = 1024
    context_size: int | None = None
    prepend_bos: bool | None = None
    store_batch_size_prompts: int = 16
    dead_feature_window: int = 100
    feature_sampling_window: int = 200
    seed: int = 42
    device: str = "auto"
    dtype: str = "float32"
    log_every: int = 1

    def check(self) -> None:
        """InputError for values that cannot work (before anything is loaded)."""
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"architecture {self.architecture!r} is not supported; use one of {', '.join(ARCHITECTURES)}."
            )
        for name in ("training_tokens", "batch_size_tokens", "k", "store_batch_size_prompts", "log_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        if self.d_sae is not None and self.d_sae < 1:
            raise InputError(f"d-sae must be at least 1 (got {self.d_sae}).")
        if self.training_tokens < self.batch_size_tokens:
            raise InputError(
                f"training tokens ({self.training_tokens}) are fewer than one batch ({self.batch_size_tokens}); "
                "raise --training-tokens or lower --batch-size-tokens."
            )
        if self.lr <= 0:
            raise InputError(f"learning rate must be positive (got {self.lr}).")
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
