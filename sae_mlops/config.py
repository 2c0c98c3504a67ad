"""Analysis options, declared once.

Every option of the quick and the full analysis is one field below, with its meaning, unit and default
in ``Field(description=...)`` and its bounds in ``ge=`` / ``le=``. The Typer commands (`sae-mlops quick`,
`sae-mlops full`), the MLproject entry points' argument parsers and the service policy's
``full_options`` are generated from these declarations (`sae_mlops.options`); a test checks that the
``MLproject`` file names every field with the same default, and docs/reference/options.md is generated from them.

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
        "model and SAE once each; the driver merges their results in shard order). Ray pays where there are more "
        "devices than one process uses (several GPUs, or nodes): a local instance costs 3-4 s more up front with "
        "one worker and 5-6 s with two on a 2-core machine (Ray's services, actors importing torch and loading model "
        "and SAE), and on one CPU machine the local pass already uses every core, so local is faster there at any "
        "size (see the scale-out guide). (default: local)",
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


# --- evals (sae_mlops.evals): k-sparse probing, absorption, auto-interpretability ------------------

Pooling = Literal["mean", "last"]
EVAL_SUITES = ("core", "probe", "absorption", "autointerp")
SynthExecutor = Literal["local", "ray"]


@user_errors
@dataclass(config=_STRICT)
class EvalTarget:
    """The SAE an eval runs on and how its model is run (the analysis options that evals use)."""

    sae: str = Field(
        description="The SAE: a directory in the prior tool's format, a SAELens directory, a SAELens release (with "
        "--sae-id), runs:/<run_id>/<path>, models:/<name>/<version> or models:/<name>@<alias>."
    )
    sae_id: str | None = Field(default=None, description="SAE id within a SAELens release given as --sae. (default: none)")
    model: str | None = Field(
        default=None,
        description="Base model: a TransformerLens name, a local Hugging Face checkpoint directory, or 'demo'. "
        "(default: the model recorded in the SAE's metadata)",
    )
    hook: str | None = Field(default=None, description="TransformerLens hook name. (default: the SAE's recorded hook)")
    context_size: int | None = Field(
        default=None, ge=2, description="Tokens per text (longer texts are cut). Unit: tokens. "
        "(default: the SAE's training context size, else 128)"
    )
    prepend_bos: bool | None = Field(
        default=None, description="Start each text with BOS. (default: as the SAE's metadata says, else the model's default)"
    )
    topk_mode: TopkMode | None = Field(
        default=None, description="Prior-format BatchTopK SAEs only: batch or threshold. (default: batch)"
    )
    threshold: float | None = Field(
        default=None, description="Activation threshold theta for --topk-mode threshold. Unit: activation. "
        "(default: required in threshold mode)"
    )
    batch_size: int = Field(
        default=16, ge=1, description="Texts per model call and per SAE encode call. Unit: texts. (default: 16)"
    )
    device: str = Field(default="auto", description="Torch device: auto, cpu, cuda, cuda:1, mps. (default: auto)")
    dtype: str = Field(default="float32", description="Model and SAE dtype: float32, float16 or bfloat16. (default: float32)")


@user_errors
@dataclass(config=_STRICT)
class ProbeOptions:
    """k-sparse probing (sae_mlops.evals.probe)."""

    datasets: str = Field(
        default="demo",
        description="Labelled datasets, comma-separated: NAME=PATH (JSONL, CSV or Parquet with a text and a label "
        "column) or PATH (named after the file), or 'demo' for the built-in tasks made from the demo corpus. "
        "(default: demo)",
    )
    text_column: str = Field(default="text", description="Column (JSONL field) holding the text. (default: text)")
    label_column: str = Field(default="label", description="Column (JSONL field) holding the label. (default: label)")
    pooling: Pooling = Field(
        default="mean",
        description="How a text's token activations become one vector: mean (over non-special tokens) or last "
        "(the last non-special token). (default: mean)",
    )
    ks: str = Field(
        default="1,2,5,10,20,50", description="Latent counts k of the k-sparse probes, comma-separated. (default: 1,2,5,10,20,50)"
    )
    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Share of each task held out for testing (stratified). Unit: fraction. (default: 0.2)"
    )
    seed: int = Field(default=0, description="Seed of the train/test split and the one-vs-rest negatives. (default: 0)")
    cache_dir: str | None = Field(
        default=None,
        description="Directory of the activation cache (one file per model, hook, dataset and pooling). "
        "(default: ~/.cache/sae-mlops/activations)",
    )
    no_cache: bool = Field(default=False, description="Neither read nor write the activation cache.")

    def __post_init__(self) -> None:
        self.k_values()

    def k_values(self) -> tuple[int, ...]:
        try:
            ks = tuple(sorted({int(k) for k in self.ks.split(",") if k.strip()}))
        except ValueError:
            raise InputError(f"--ks {self.ks!r} is not a list of whole numbers; write e.g. 1,2,5,10.") from None
        if not ks or ks[0] < 1:
            raise InputError(f"--ks {self.ks!r} needs whole numbers of at least 1; write e.g. 1,2,5,10.")
        return ks


@user_errors
@dataclass(config=_STRICT)
class AbsorptionOptions:
    """First-letter feature absorption (sae_mlops.evals.absorption)."""

    absorption_min_probe_f1: float = Field(
        default=0.6, ge=0.0, le=1.0,
        description="A letter is evaluated only when the first-letter probe's test F1 on it reaches this "
        "(SAEBench's floor). Unit: F1. (default: 0.6)",
    )
    absorption_min_letters: int = Field(
        default=3, ge=1,
        description="Fewer evaluated letters than this: the activations do not encode first letters and no absorption "
        "figure is reported. Unit: letters. (default: 3)",
    )
    absorption_max_k: int = Field(
        default=10, ge=1, description="Largest k of the k-sparse probes that find a letter's main and split latents. (default: 10)"
    )


@user_errors
@dataclass(config=_STRICT)
class AutointerpOptions:
    """Auto-interpretability through an OpenAI-compatible endpoint (sae_mlops.features.label)."""

    llm_model: str = Field(default="gpt-4o-mini", description="Model name at the endpoint. (default: gpt-4o-mini)")
    llm_base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1. (default: OpenAI)"
    )
    llm_api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Environment variable holding the API key (never logged). (default: OPENAI_API_KEY)"
    )
    autointerp_features: int = Field(
        default=50, ge=1, description="Features labelled and scored: the N most frequent that fired. Unit: features. (default: 50)"
    )
    detection_activating: int = Field(
        default=5, ge=1, description="Held-out activating snippets per detection request. Unit: snippets. (default: 5)"
    )
    detection_non_activating: int = Field(
        default=5, ge=1, description="Non-activating snippets per detection request. Unit: snippets. (default: 5)"
    )
    non_activating_quantile: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="A non-activating snippet holds no activation of the feature above this quantile of its non-zero "
        "activations (0: none at all). Unit: quantile. (default: 0.0)",
    )
    llm_concurrency: int = Field(default=4, ge=1, description="Requests in flight at once. (default: 4)")
    llm_rpm: float = Field(default=60.0, ge=0.0, description="Requests per minute at most (0: no limit). (default: 60.0)")


@user_errors
@dataclass(config=_STRICT)
class EvalsOptions:
    """Which evals `sae-mlops evals` runs."""

    suite: str = Field(
        default="core,probe,absorption",
        description="Evals to run, comma-separated, from core (the quick analysis; the full analysis when autointerp is "
        "asked), probe, absorption and autointerp. (default: core,probe,absorption)",
    )

    def __post_init__(self) -> None:
        self.names()

    def names(self) -> list[str]:
        names = [s.strip() for s in self.suite.split(",") if s.strip()]
        bad = [s for s in names if s not in EVAL_SUITES]
        if bad or not names:
            raise InputError(f"--suite {self.suite!r}: give some of {', '.join(EVAL_SUITES)}, comma-separated.")
        return names


@user_errors
@dataclass(config=_STRICT)
class SynthConfig:
    """A synthetic world with known features (sae_lens.synthetic: Zipfian firing, low-rank correlations,
    a hierarchy) and the grid of SAE recipes trained and scored against its truth (`sae-mlops synth`).
    The defaults are the default size (finishes in minutes on 2 CPU cores); docs/guides/synth.md gives
    the tiny and the large sizes."""

    features: int = Field(default=256, ge=2, description="True features in the world. Unit: features. (default: 256)")
    d_model: int = Field(default=64, ge=2, description="Width of the world's activations (the SAE's d_in). Unit: dims. (default: 64)")
    world_seed: int = Field(default=0, description="Seed of the world (dictionary, firing probabilities, correlations, hierarchy). (default: 0)")
    zipf_exponent: float = Field(default=1.0, gt=0.0, description="Exponent of the Zipfian firing probabilities. (default: 1.0)")
    max_firing_prob: float = Field(
        default=0.2, gt=0.0, le=1.0, description="Firing probability of the most frequent feature. Unit: probability. (default: 0.2)"
    )
    min_firing_prob: float = Field(
        default=0.005, gt=0.0, le=1.0, description="Firing probability of the rarest feature. Unit: probability. (default: 0.005)"
    )
    correlation_rank: int = Field(
        default=16, ge=0, description="Rank of the low-rank feature correlation matrix; 0 = independent features. (default: 16)"
    )
    correlation_scale: float = Field(
        default=0.1, ge=0.0, description="Scale of the feature correlations (sae_lens LowRankCorrelationConfig). (default: 0.1)"
    )
    hierarchy_roots: int = Field(
        default=16, ge=0, description="Root features of the hierarchy (children fire only with their parent); 0 = none. (default: 16)"
    )
    hierarchy_branching: int = Field(default=4, ge=2, description="Children per hierarchy parent. Unit: features. (default: 4)")
    magnitude_std: float = Field(
        default=0.1, ge=0.0, description="Standard deviation of a firing feature's magnitude (mean 1). Unit: activation. (default: 0.1)"
    )
    architectures: str = Field(
        default="standard,topk,batchtopk,jumprelu,matryoshka",
        description="Comma-separated SAE architectures of the grid: standard, topk, batchtopk, jumprelu, matryoshka "
        "(SAELens's Matryoshka BatchTopK). (default: standard,topk,batchtopk,jumprelu,matryoshka)",
    )
    widths: str = Field(default="256,512", description="Comma-separated dictionary sizes (d_sae) of the grid. Unit: features. (default: 256,512)")
    k_values: str = Field(
        default="4,8",
        description="Comma-separated L0 targets k of the topk, batchtopk and matryoshka recipes. Unit: features. (default: 4,8)",
    )
    l1_coefficients: str = Field(
        default="0.2,0.5", description="Comma-separated L1 coefficients of the standard recipes. (default: 0.2,0.5)"
    )
    l0_coefficients: str = Field(
        default="1,10", description="Comma-separated L0 coefficients of the jumprelu recipes. (default: 1,10)"
    )
    baselines: str = Field(
        default="frozen-decoder",
        description="Comma-separated random baselines (frozen-decoder, soft-frozen-decoder, frozen-encoder) trained "
        "for each topk recipe; none (or empty) for none. (default: frozen-decoder)",
    )
    training_samples: int = Field(
        default=100_000, ge=1, description="Synthetic activations each recipe trains on. Unit: samples. (default: 100000)"
    )
    batch_size: int = Field(default=256, ge=1, description="Samples per training step. Unit: samples. (default: 256)")
    lr: float = Field(default=3e-3, gt=0.0, description="Adam learning rate. (default: 0.003)")
    eval_samples: int = Field(
        default=20_000, ge=1, description="Fresh samples each SAE is scored on against the truth. Unit: samples. (default: 20000)"
    )
    seed: int = Field(default=42, description="Training and evaluation seed of every recipe. (default: 42)")
    threads: int = Field(
        default=1, ge=1, description="Torch threads per recipe (fixed so that local and Ray runs give identical results). (default: 1)"
    )
    device: str = Field(default="cpu", description="Torch device for training: cpu, cuda, cuda:N. (default: cpu)")
    log_every: int = Field(default=10, ge=1, description="Keep training metrics every this many steps. Unit: steps. (default: 10)")
    executor: SynthExecutor = Field(
        default="local", description="Where recipes train: local (one after another) or ray (one Ray task each). (default: local)"
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster (host:port, ray://host:10001 or auto) for --executor ray. (default: a local Ray instance on "
        "127.0.0.1, stopped at the end)",
    )
    bootstrap_resamples: int = Field(
        default=2000, ge=100, description="Bootstrap resamples (over recipes) of each rank correlation's 95% interval. (default: 2000)"
    )

    def __post_init__(self) -> None:
        if self.min_firing_prob > self.max_firing_prob:
            raise InputError(
                f"--min-firing-prob ({self.min_firing_prob:g}) is above --max-firing-prob ({self.max_firing_prob:g}); swap them."
            )
        if self.hierarchy_roots * (1 + self.hierarchy_branching) > self.features:
            raise InputError(
                f"a hierarchy of {self.hierarchy_roots} roots x {self.hierarchy_branching} children needs more than "
                f"--features {self.features}; lower --hierarchy-roots or raise --features."
            )
        if self.executor == "local" and self.ray_address:
            raise InputError("--ray-address needs --executor ray.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@user_errors
@dataclass(config=_STRICT)
class EvalRunOptions:
    """Where an eval writes and how it is tracked."""

    out: str | None = Field(default=None, description="Output directory. (default: analysis/<sae dir name>/<eval>_<UTC timestamp>)")
    run_id: str | None = Field(
        default=None,
        description="Log into this existing MLflow run (e.g. the SAE's analysis run) instead of a new one. (default: a new "
        "run, tagged with the SAE's hash and linked to its analysis run when one exists)",
        json_schema_extra={"mlproject": False},
    )
    experiment: str | None = Field(
        default=None, description="MLflow experiment. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)",
        json_schema_extra={"mlproject": False},
    )
    run_name: str | None = Field(default=None, description="MLflow run name. (default: <eval> · <SAE name>)",
                                 json_schema_extra={"mlproject": False})
    no_track: bool = Field(default=False, description="Do not log to MLflow; only write files.", json_schema_extra={"mlproject": False})
    quiet: bool = Field(default=False, description="Only warnings and errors on stderr; no progress bars.",
                        json_schema_extra={"mlproject": False, "short": "-q"})


@user_errors
@dataclass(config=_STRICT)
class SynthRunOptions:
    """Where `sae-mlops synth` writes and how it is tracked."""

    out: str | None = Field(
        default=None, description="Directory for the world, the SAEs (SAELens format) and the report. (default: synth/<UTC timestamp>)"
    )
    experiment: str | None = Field(
        default=None,
        description="MLflow experiment. (default: $MLFLOW_EXPERIMENT_NAME, else sae-mlops)",
        json_schema_extra={"mlproject": False},
    )
    quiet: bool = Field(
        default=False, description="Only warnings and errors on stderr.", json_schema_extra={"mlproject": False, "short": "-q"}
    )
