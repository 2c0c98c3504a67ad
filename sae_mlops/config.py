"""Analysis configuration (one dataclass shared by the CLI, the MLproject entry points and the service)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class AnalysisConfig:
    """Everything a quick (or full) analysis needs to know.

    sae: a prior-format directory, a SAELens directory, ``release:sae_id`` / ``--sae-id``, ``runs:/<id>/<path>``,
        ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.
    model: a TransformerLens model name, a local Hugging Face checkpoint directory, or ``demo``;
        None uses the model recorded in the SAE's metadata.
    corpus: JSON list[str], JSONL (``text_field``), Parquet (``text_field`` column) or a plain-text file;
        None with the demo model uses the demo corpus.
    max_tokens: token budget: analysed (non-special) tokens to process, or the whole corpus if smaller.
    context_size: tokens per window (None: the SAE's training context size, else 128).
    batch_size: windows per batch.
    prepend_bos: start each window with BOS (None: as the SAE's metadata says, else the model's default).
    topk_mode: for prior-format BatchTopK SAEs: "batch" (batch-global rule) or "threshold" (JumpReLU).
    threshold: theta for threshold mode (None: estimated on the corpus).
    dead/rare/dense: a feature is dead with frequency 0, rare below `rare_threshold`, dense above
        `dense_threshold` (fractions of analysed tokens).
    """

    sae: str
    sae_id: str | None = None
    model: str | None = None
    corpus: str | None = None
    text_field: str = "text"
    hook: str | None = None
    max_tokens: int = 1_000_000
    context_size: int | None = None
    batch_size: int = 16
    prepend_bos: bool | None = None
    topk_mode: str | None = None
    threshold: float | None = None
    threshold_calibration_tokens: int = 65_536
    rare_threshold: float = 1e-5
    dense_threshold: float = 0.1
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
