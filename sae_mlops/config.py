"""Analysis options, declared once.

Every option of the quick and the full analysis is one field below, with its meaning, unit and default
in ``Field(description=...)`` and its bounds in ``ge=`` / ``le=``. The Typer commands (`sae-mlops quick`,
`sae-mlops full`), the MLproject entry points' argument parsers and the service policy's
``full_options`` are generated from these declarations (`sae_mlops.options`); a test checks that the
``MLproject`` file and the README's option tables name every field with the same default.

The classes are pydantic dataclasses: plain dataclasses (``dataclasses.asdict``, equality, keyword
construction) whose types and bounds are validated on construction. Checks that involve more than one
field live in ``__post_init__``. Use :func:`sae_mlops.options.build` to construct one from user input:
it turns a validation error into one `InputError` sentence naming the option.

Field metadata (``json_schema_extra``) read by the generators:
    ``cli``: the option's name on the command line / in MLproject when it differs from the field name;
    ``option``: False for fields that are not user options (set by the program).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from sae_mlops.errors import InputError
from sae_mlops.options import user_errors

_STRICT = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

TopkMode = Literal["batch", "threshold"]
CooccurrenceMeasure = Literal["correlation", "jaccard", "pmi"]


@user_errors
@dataclass(config=_STRICT)
class AnalysisConfig:
    """Everything a quick (or full) analysis needs to know: what to analyse, on which tokens, how."""

    sae: str = Field(
        description="The SAE: a directory in the prior tool's format (config.json + weights.pt), a SAELens "
        "directory (cfg.json + sae_weights.safetensors), a SAELens release (with --sae-id), "
        "runs:/<run_id>/<path>, models:/<name>/<version> or models:/<name>@<alias>."
    )
    sae_id: str | None = Field(default=None, description="SAE id within a SAELens release given as --sae. (default: none)")
    model: str | None = Field(
        default=None,
        description="Base model: a TransformerLens name (e.g. gpt2), a local Hugging Face checkpoint directory, "
        "or 'demo'. (default: the model recorded in the SAE's metadata)",
    )
    corpus: str | None = Field(
        default=None,
        description="Texts to analyse: JSON list of strings, JSONL (see --text-field), Parquet (column --text-field) "
        "or a plain-text file. (default: the demo corpus when --model is demo)",
    )
    text_field: str = Field(default="text", description="Field (JSONL) or column (Parquet) holding the text. (default: text)")
    hook: str | None = Field(
        default=None, description="TransformerLens hook name, e.g. blocks.9.hook_resid_post. (default: the SAE's recorded hook)"
    )
    max_tokens: int = Field(
        default=1_000_000,
        ge=1,
        description="Token budget: analysed (non-special) tokens to process, or the whole corpus if smaller. "
        "Unit: tokens. (default: 1000000)",
    )
    context_size: int | None = Field(
        default=None, ge=2, description="Tokens per window. Unit: tokens. (default: the SAE's training context size, else 128)"
    )
    batch_size: int = Field(
        default=16, ge=1, description="Windows per batch (batch-global BatchTopK depends on it). Unit: windows. (default: 16)"
    )
    prepend_bos: bool | None = Field(
        default=None,
        description="Start each window with BOS. (default: as the SAE's metadata says, else the model's default)",
    )
    topk_mode: TopkMode | None = Field(
        default=None,
        description="Prior-format BatchTopK SAEs only: 'batch' (the batch-global top-k rule) or 'threshold' "
        "(JumpReLU with one threshold). (default: batch)",
    )
    threshold: float | None = Field(
        default=None,
        description="Activation threshold theta for --topk-mode threshold. Unit: activation. "
        "(default: estimated on the corpus)",
    )
    threshold_calibration_tokens: int = Field(
        default=65_536,
        ge=1,
        description="Tokens used to estimate theta for threshold mode when none is given. Unit: tokens. (default: 65536)",
        json_schema_extra={"option": False},
    )
    rare_threshold: float = Field(
        default=1e-5,
        ge=0.0,
        le=1.0,
        description="A feature firing on a fraction of analysed tokens in (0, this) is rare. Unit: fraction. "
        "(default: 1e-05)",
    )
    dense_threshold: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="A feature firing on more than this fraction of analysed tokens is dense. Unit: fraction. "
        "(default: 0.1)",
    )
    device: str = Field(
        default="auto", description="Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps. (default: auto)"
    )
    dtype: str = Field(
        default="float32", description="Model and SAE dtype: float32, float16 or bfloat16. (default: float32)"
    )
    progress: bool = Field(
        default=True, description="Show progress bars (the CLI's --quiet turns them off). (default: true)", json_schema_extra={"option": False}
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form extras recorded with the configuration.",
        json_schema_extra={"option": False},
    )

    def __post_init__(self) -> None:
        if self.rare_threshold > self.dense_threshold:
            raise InputError(
                f"--rare-threshold ({self.rare_threshold:g}) is above --dense-threshold ({self.dense_threshold:g}); "
                "a feature cannot be rare and dense at once, lower --rare-threshold or raise --dense-threshold."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@user_errors
@dataclass(config=_STRICT)
class FullOptions:
    """What the full analysis adds to quick, and its sizes."""

    examples_per_feature: int = Field(
        default=25, ge=1, description="Top activating examples kept per feature (streaming top-k). Unit: examples. (default: 25)"
    )
    context_window: int = Field(
        default=10, ge=0, description="Tokens either side of an example in its context string. Unit: tokens. (default: 10)"
    )
    cooccurrence_measure: CooccurrenceMeasure = Field(
        default="correlation",
        description="Co-occurrence measure: correlation (phi), jaccard or pmi. (default: correlation)",
        json_schema_extra={"cli": "cooccurrence"},
    )
    dense_limit: int = Field(
        default=4096,
        ge=0,
        description="Largest d_sae for which co-occurrence is counted densely in the pass and dense d_sae x d_sae "
        "float32 .npy matrices are written (4096: 64 MiB per matrix; above it no d_sae x d_sae array exists, "
        "only neighbour lists, which are always written). Unit: features. (default: 4096)",
    )
    neighbours: int = Field(
        default=32,
        ge=1,
        description="Neighbours per feature in the similarity and co-occurrence neighbour lists. Unit: features. "
        "(default: 32)",
    )
    logit_lens_tokens: int = Field(
        default=10, ge=1, description="Top and bottom tokens per feature in the logit lens. Unit: tokens. (default: 10)"
    )
    heatmap_features: int = Field(
        default=200,
        ge=2,
        description="Features in the clustered heatmaps (the most variable ones). Unit: features. (default: 200)",
    )
    dashboards: int = Field(
        default=0,
        ge=0,
        description="Also write feature dashboards (as `sae-mlops dashboard --top N`) for the N most frequent "
        "features, under dashboard/ and logged with the run. Unit: features. (default: 0, none)",
    )
    shard_rows: int = Field(
        default=500_000,
        ge=1,
        description="Rows per Parquet shard of the activation database. Unit: rows. (default: 500000)",
        json_schema_extra={"option": False},
    )


Executor = Literal["local", "ray"]


@user_errors
@dataclass(config=_STRICT)
class ExecutionOptions:
    """How the pass is executed: in shards (whole batches, checkpointed so that an interrupted analysis
    resumes), in this process or on a Ray cluster. Results do not depend on these options' values
    except ``shard_tokens`` (float sums are added shard by shard; counts and examples are exact)."""

    executor: Executor = Field(
        default="local",
        description="Where shards run: local (this process, one after another) or ray (Ray actors that load "
        "model and SAE once each; the driver merges their results in shard order). (default: local)",
    )
    workers: int = Field(
        default=1, ge=1, description="Ray actors processing shards at once (executor ray). Unit: workers. (default: 1)"
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to connect to (host:port of a head, ray://host:10001, or auto). "
        "(default: start a local Ray instance for this analysis and stop it at the end)",
    )
    cpus_per_worker: int = Field(
        default=1, ge=1, description="CPUs requested per Ray actor; also its torch thread count. Unit: CPUs. (default: 1)"
    )
    gpus_per_worker: float = Field(
        default=0.0, ge=0.0, description="GPUs requested per Ray actor (fractions share a GPU). Unit: GPUs. (default: 0)"
    )
    shard_tokens: int = Field(
        default=131_072,
        ge=1,
        description="Analysed tokens per shard (a shard ends with the first whole batch that reaches it); "
        "each finished shard is checkpointed under <out>/checkpoint. Unit: tokens. (default: 131072)",
    )

    def __post_init__(self) -> None:
        if self.executor == "local" and self.workers > 1:
            raise InputError(
                f"--workers {self.workers} needs --executor ray; the local executor runs shards one after another."
            )
        if self.executor == "local" and self.gpus_per_worker > 0:
            raise InputError("--gpus-per-worker needs --executor ray; the local executor uses --device.")


@user_errors
@dataclass(config=_STRICT)
class RunOptions:
    """Where an analysis writes and how it is tracked (options of the commands, not of the analysis)."""

    out: str | None = Field(
        default=None, description="Output directory. (default: analysis/<sae dir name>/<kind>_<UTC timestamp>)"
    )
    experiment: str | None = Field(
        default=None,
        description="MLflow experiment for the run. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)",
        json_schema_extra={"mlproject": False},
    )
    run_name: str | None = Field(
        default=None,
        description="MLflow run name. (default: <kind> · <SAE name> · <architecture> d<d_sae> k<k>, "
        "e.g. quick · topk_512 · topk d512 k16)",
        json_schema_extra={"mlproject": False},
    )
    no_track: bool = Field(
        default=False, description="Do not log to MLflow; only write files.", json_schema_extra={"mlproject": False}
    )
    resume: str | None = Field(
        default=None,
        description="Continue the interrupted analysis in this output directory from its first unfinished shard "
        "(as re-running with the same --out does; refuses when the directory holds none or the inputs differ). "
        "(default: none)",
        json_schema_extra={"mlproject": False},
    )
    quiet: bool = Field(
        default=False,
        description="Only warnings and errors on stderr; no progress bars.",
        json_schema_extra={"mlproject": False, "short": "-q"},
    )
