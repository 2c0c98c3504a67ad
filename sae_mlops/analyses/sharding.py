"""Sharded, resumable passes: the plan, the checkpoint and the local executor.

A pass is cut into shards of whole batches (:func:`sae_mlops.core.tokens.plan_shards`), so that a
batch-global rule (BatchTopK) sees exactly the batches of an unsharded pass; the local executor
reuses the token ids that planning produced, so the corpus is tokenized once. Each shard runs
with fresh collectors; its result is the collectors' declared state (safetensors + JSON, see
:mod:`sae_mlops.core.collectors.state`) plus the activation-database parts of its token range.
Results are merged in shard order, so they do not depend on how many workers ran the shards:
integer counts and examples are exact, float sums are added shard by shard.

Checkpoint layout (``<out>/checkpoint``)::

    manifest.json            fingerprint of the pass, the shard plan, finished shards, MLflow run id
    shard-NNNNN/state.*      the shard's collector state (safetensors + JSON)
    shard-NNNNN/db/          its activation-database parts (full analysis)

A shard is written to ``shard-NNNNN.tmp-*`` and renamed when complete; the manifest is rewritten
atomically after it, so a shard listed as done is always complete. Re-running the same analysis on
the same output directory continues after the last finished shard; a run whose fingerprint differs
(SAE, corpus, model, pass options) is refused with one sentence naming the difference. The
checkpoint is removed once the analysis's outputs are written.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sae_mlops.core.blocks import BlockLayout
from sae_mlops.core.collectors.base import Collector
from sae_mlops.core.engine import Engine, PassStats
from sae_mlops.core.tokens import PoolCache, ShardSpec, iter_batches, plan_pass
from sae_mlops.errors import InputError
from sae_mlops.files import atomic_write_text
from sae_mlops.outlock import check_fence

if TYPE_CHECKING:
    from sae_mlops.analyses.quick import Inputs
    from sae_mlops.config import ExecutionOptions, FullOptions

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
FORMAT = "sae-mlops checkpoint v1"

#: builds a shard's collectors: parts_dir None -> only the collectors with state (to load a saved
#: shard into); else also the activation-database parts writer, writing there with that prefix
CollectorFactory = Callable[[Path | None, str], list[Collector]]


def make_collectors(kind: str, inputs: Inputs, opts: FullOptions | None, parts_dir: Path | None,
                    prefix: str = "part-", blocks: BlockLayout | None = None) -> list[Collector]:
    """The collectors of a ``kind`` ("quick" or "full") pass, in a fixed order: sparsity,
    reconstruction, downstream; for full also examples, co-occurrence (d_sae <= dense limit); the
    per-block statistics when ``blocks`` is given (the intervals); and, when ``parts_dir`` is given,
    the activation-database parts writer (last)."""
    from sae_mlops.core.collectors.cooccurrence import CooccurrenceCollector
    from sae_mlops.core.collectors.downstream import DownstreamCollector
    from sae_mlops.core.collectors.examples import TopExamplesCollector
    from sae_mlops.core.collectors.reconstruction import ReconstructionCollector
    from sae_mlops.core.collectors.sparsity import SparsityCollector

    info, cfg = inputs.sae.info, inputs.cfg
    collectors: list[Collector] = [
        SparsityCollector(info.d_sae, cfg.rare_threshold, cfg.dense_threshold),
        ReconstructionCollector(info.d_in),
        DownstreamCollector(),
    ]
    if kind == "full":
        assert opts is not None
        collectors.append(TopExamplesCollector(info.d_sae, opts.examples_per_feature, opts.context_window))
        if info.d_sae <= opts.dense_limit:
            collectors.append(CooccurrenceCollector(info.d_sae))
    if blocks is not None:
        from sae_mlops.core.collectors.blocks import BlockStatsCollector

        collectors.append(BlockStatsCollector(blocks, info.d_in, info.d_sae))
    if kind == "full" and parts_dir is not None:
        assert opts is not None
        from sae_mlops.outputs.activation_db.writer import ActivationPartsWriter

        collectors.append(ActivationPartsWriter(parts_dir, info.d_sae, opts.shard_rows, prefix))
    return collectors


def pass_fingerprint(inputs: Inputs, kind: str, shard_tokens: int, opts: FullOptions | None = None) -> dict[str, Any]:
    """What makes two passes the same pass: the SAE's content, the corpus, the model and hook, and
    every option that changes the batches or what the collectors keep. Options used only after the
    pass (neighbours, measure, plots) and where it runs (device, executor, workers) are not in it."""
    cfg, info = inputs.cfg, inputs.sae.info
    fp: dict[str, Any] = {
        "kind": kind,
        "sae_hash": info.content_hash,
        "corpus_digest": inputs.corpus.digest,
        "model": inputs.model.name,
        "hook": inputs.site.name,
        "context_size": inputs.plan.context_size,
        "prepend_bos": inputs.plan.prepend_bos,
        "batch_size": cfg.batch_size,
        "max_tokens": cfg.max_tokens,
        "dtype": cfg.dtype,
        "topk_mode": info.topk_mode,
        "threshold": info.threshold,
        "rare_threshold": cfg.rare_threshold,
        "dense_threshold": cfg.dense_threshold,
        "shard_tokens": shard_tokens,
    }
    if opts is not None:
        fp.update(examples_per_feature=opts.examples_per_feature, context_window=opts.context_window,
                  dense_limit=opts.dense_limit)
    return fp


_LABELS = {"sae_hash": "SAE (content hash)", "corpus_digest": "corpus (digest)", "kind": "analysis kind"}


class Checkpoint:
    """The checkpoint of one output directory (see the module docstring)."""

    def __init__(self, out: Path):
        self.dir = Path(out) / CHECKPOINT_DIR
        self.manifest_path = self.dir / "manifest.json"
        self.fingerprint: dict[str, Any] = {}
        self.plan: list[ShardSpec] = []
        self.blocks: BlockLayout | None = None  # the pass's blocks of windows (intervals), planned with the shards
        self.done: dict[int, dict[str, Any]] = {}  # shard index -> its pass stats
        self.run_id: str | None = None
        self.resumed = False
        self.sae_info: dict[str, Any] = {}  # architecture, d_sae, k: for the run's name
        #: the pools planning built, kept for the shards of this process (not saved: a resumed
        #: or remote shard tokenizes its documents again)
        self.pools: PoolCache | None = None

    @classmethod
    def open(cls, out: Path, fingerprint: dict[str, Any], require_existing: bool = False) -> Checkpoint:
        """The checkpoint of ``out``: the unfinished one there when its fingerprint matches (an
        `InputError` naming what differs otherwise), else a new one. require_existing: `InputError`
        when ``out`` holds no unfinished analysis (``--resume``)."""
        ck = cls(out)
        if ck.manifest_path.is_file():
            try:
                data = json.loads(ck.manifest_path.read_text(encoding="utf-8"))
                assert data.get("format") == FORMAT
            except (OSError, ValueError, AssertionError):
                raise InputError(
                    f"{ck.manifest_path} is not a readable checkpoint; delete {ck.dir} to start the analysis afresh."
                ) from None
            old = data["fingerprint"]
            diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
            if diff:
                what = "; ".join(
                    f"{_LABELS.get(k, k)} was {old.get(k)!r} there, {fingerprint.get(k)!r} now" for k in diff
                )
                raise InputError(
                    f"{out} holds an unfinished analysis of a different pass ({what}); resume it with the same inputs "
                    f"and options, or choose another --out (or delete {ck.dir})."
                )
            ck.fingerprint = old
            ck.plan = [ShardSpec(**s) for s in data["plan"]]
            ck.blocks = BlockLayout.from_dict(data["blocks"]) if data.get("blocks") else None
            ck.done = {int(k): v for k, v in data["done"].items()}
            ck.run_id = data.get("mlflow_run_id")
            ck.resumed = True
            for stray in ck.dir.glob("shard-*.tmp-*"):
                shutil.rmtree(stray, ignore_errors=True)
            return ck
        if require_existing:
            raise InputError(f"{out} holds no unfinished analysis to resume (no {ck.manifest_path}).")
        if ck.dir.exists():
            shutil.rmtree(ck.dir)
        ck.fingerprint = fingerprint
        return ck

    def save(self) -> None:
        check_fence(self.dir.parent)  # an orphaned attempt stops here (sae_mlops.outlock)
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "plan": [asdict(s) for s in self.plan],
            "blocks": self.blocks.to_dict() if self.blocks is not None else None,
            "done": {str(k): v for k, v in sorted(self.done.items())},
            "mlflow_run_id": self.run_id,
        }
        atomic_write_text(self.manifest_path, json.dumps(data, indent=1))

    @property
    def tokens_done(self) -> int:
        return sum(s.tokens for s in self.plan if s.index in self.done)

    def shard_dir(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}"

    def staging_dir(self, index: int) -> Path:
        check_fence(self.dir.parent)
        path = self.dir / f"shard-{index:05d}.tmp-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def commit(self, index: int, staging: Path, stats: PassStats, record: bool = True) -> None:
        """Publish a finished shard: rename its staging directory, then (``record``: its state was
        saved) record it in the manifest as done."""
        check_fence(self.dir.parent)
        final = self.shard_dir(index)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        if record:
            self.done[index] = asdict(stats)
            self.save()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def shard_prefix(index: int) -> str:
    return f"part-{index:05d}-"


def state_collectors(collectors: Sequence[Collector]) -> list[Any]:
    from sae_mlops.core.collectors.state import StateCollector

    return [c for c in collectors if isinstance(c, StateCollector)]


def run_shard(engine: Engine, inputs: Inputs, spec: ShardSpec, factory: CollectorFactory, shard_dir: Path,
              bar: Any = None, save: bool = True, pools: PoolCache | None = None) -> tuple[list[Collector], PassStats]:
    """Run one shard with fresh collectors; its activation-database parts go to ``shard_dir/db`` and,
    when ``save``, its collector state to ``shard_dir/state.*`` (timed as the pass part "checkpoint").
    pools: the planned pools (the shard's windows are not tokenized again)."""
    from sae_mlops.core.collectors.state import save_states

    collectors = factory(shard_dir / "db", shard_prefix(spec.index))
    cfg = inputs.cfg
    batches = iter_batches(inputs.corpus.texts, inputs.model.tokenizer, inputs.plan, cfg.batch_size, cfg.max_tokens,
                           shard=spec, cache=pools)
    stats = engine.run(batches, collectors, progress=False, token_offset=spec.token_start, bar=bar)
    for c in collectors:  # buffered work (co-occurrence pairs, the last database part) is the collector's
        t0, c0 = time.perf_counter(), time.process_time()
        if hasattr(c, "sync"):
            c.sync()
        if hasattr(c, "flush"):
            c.flush()
        _add_part(stats, getattr(c, "name", type(c).__name__), time.perf_counter() - t0, time.process_time() - c0)
    if save:
        t0, c0 = time.perf_counter(), time.process_time()
        save_states(state_collectors(collectors), shard_dir / "state")
        _add_part(stats, "checkpoint", time.perf_counter() - t0, time.process_time() - c0)
    return collectors, stats


def _add_part(stats: PassStats, name: str, seconds: float, cpu_seconds: float) -> None:
    stats.part_seconds[name] = stats.part_seconds.get(name, 0.0) + seconds
    stats.part_cpu_seconds[name] = stats.part_cpu_seconds.get(name, 0.0) + cpu_seconds
    stats.seconds += seconds
    stats.cpu_seconds += cpu_seconds


def load_shard(factory: CollectorFactory, shard_dir: Path) -> list[Collector]:
    """The collectors of a finished shard, from its saved state."""
    from sae_mlops.core.collectors.state import load_states

    collectors = factory(None, "")
    load_states(state_collectors(collectors), shard_dir / "state")
    return collectors


def merge_into(acc: list[Collector] | None, collectors: list[Collector]) -> list[Collector]:
    """Merge ``collectors`` (the next shard) into ``acc`` (the shards before it), state collectors only."""
    mine = state_collectors(collectors)
    if acc is None:
        return mine
    for a, c in zip(acc, mine, strict=True):
        a.merge(c)
    return acc


def pass_stats_from(d: dict[str, Any]) -> PassStats:
    return PassStats(**d)


class PassObserver(Protocol):
    """What the caller learns while a sharded pass runs (the workflows layer logs it to MLflow)."""

    def started(self, checkpoint: Checkpoint, total_tokens: int) -> None: ...

    def progress(self, tokens_done: int, total_tokens: int) -> None: ...


@dataclass
class ShardedPass:
    """A finished sharded pass: the merged collectors (state collectors, in factory order), the merged
    stats, the activation-database part directories in stream order, and the checkpoint."""

    collectors: list[Collector]
    stats: PassStats
    part_dirs: list[Path]
    checkpoint: Checkpoint
    shards: int = 0
    shards_resumed: int = 0
    merge_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def open_checkpoint(inputs: Inputs, kind: str, out: Path, exec_opts: ExecutionOptions, opts: FullOptions | None,
                    resume: bool) -> Checkpoint:
    """Open (or start) the checkpoint and make sure it has a shard plan (planned once, kept on resume)."""
    ck = Checkpoint.open(out, pass_fingerprint(inputs, kind, exec_opts.shard_tokens, opts), require_existing=resume)
    if not ck.plan or ck.blocks is None:
        cfg = inputs.cfg
        facts: dict[str, Any] = {}
        ck.pools = PoolCache() if exec_opts.executor == "local" else None
        plan, ck.blocks = plan_pass(inputs.corpus.texts, inputs.model.tokenizer, inputs.plan, cfg.batch_size,
                                    cfg.max_tokens, exec_opts.shard_tokens, facts=facts, cache=ck.pools)
        if not ck.plan:
            ck.plan = plan
        if ck.plan and not facts.get("predicts", True):
            raise InputError(
                f"the corpus '{inputs.corpus.path}' gives 0 next-token predictions (each of its "
                f"{sum(s.tokens for s in ck.plan):,} analysable tokens ends its window, e.g. one-token documents), so "
                "loss recovered and KL cannot be measured; give documents of at least two tokens."
            )
    info = inputs.sae.info
    ck.sae_info = {"architecture": info.architecture, "d_sae": info.d_sae,
                   "k": info.k if info.k is not None else (info.extra or {}).get("k")}
    if ck.resumed:
        log.info("resuming %s: %d of %d shards done (%d tokens)", out, len(ck.done), len(ck.plan), ck.tokens_done)
    return ck


def finish_pass(ck: Checkpoint, factory: CollectorFactory, results: dict[int, tuple[list[Collector], PassStats]]) -> ShardedPass:
    """Merge every shard in shard order: in memory where this process ran it (``results``), else from
    its saved state; stats add up the same way. Timed as ``merge_seconds``."""
    check_fence(ck.dir.parent)  # the outputs are written next
    t0 = time.perf_counter()
    acc: list[Collector] | None = None
    stats = PassStats()
    for spec in ck.plan:
        if spec.index in results:
            collectors, shard_stats = results[spec.index]
        else:
            collectors, shard_stats = load_shard(factory, ck.shard_dir(spec.index)), pass_stats_from(ck.done[spec.index])
        acc = merge_into(acc, collectors)
        stats.add(shard_stats)
    assert acc is not None
    merged = time.perf_counter() - t0
    part_dirs = [ck.shard_dir(s.index) / "db" for s in ck.plan]
    return ShardedPass(acc, stats, part_dirs, ck, shards=len(ck.plan), merge_seconds=merged)


def run_local(inputs: Inputs, engine: Engine, ck: Checkpoint, factory: CollectorFactory, bar: Any,
              observer: PassObserver | None) -> ShardedPass:
    """Run the unfinished shards one after another in this process. Every shard but the last is
    saved and recorded in the checkpoint as it finishes; the last is merged straight from memory."""
    results: dict[int, tuple[list[Collector], PassStats]] = {}
    total = sum(s.tokens for s in ck.plan)
    done_tokens = ck.tokens_done
    for spec in ck.plan:
        if spec.index in ck.done:
            continue
        last = spec.index == ck.plan[-1].index
        staging = ck.staging_dir(spec.index)
        collectors, stats = run_shard(engine, inputs, spec, factory, staging, bar=bar, save=not last, pools=ck.pools)
        ck.commit(spec.index, staging, stats, record=not last)
        results[spec.index] = (collectors, stats)
        done_tokens += spec.tokens
        if observer is not None:
            observer.progress(done_tokens, total)
    resumed = len(ck.plan) - len(results)
    out = finish_pass(ck, factory, results)
    out.shards_resumed = resumed
    return out
