"""Full analysis: the quick pass plus per-feature examples, co-occurrence counts and the activation
database, all collected in the same single pass; then matrices, logit lens, summaries, plots, reports,
each timed as a stage (``time/<stage>`` metrics, see :mod:`sae_mlops.telemetry`).

Everything after the pass works from collected results and the SAE/unembedding weights, never from
the corpus again (co-occurrence beyond the dense limit reads the activation database's CSR).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_mlops.outputs.summaries import write_block_sums
from sae_mlops.outputs.activation_db.writer import finalize_database
from sae_mlops.analyses.quick import Inputs, assemble_result, executor_metrics, prepare, run_sharded_pass, sharding_params
from sae_mlops.core.collectors.cooccurrence import CooccurrenceCollector, measure_from_counts
from sae_mlops.core.collectors.examples import TopExamplesCollector
from sae_mlops.core.collectors.sparsity import SparsityCollector
from sae_mlops.config import AnalysisConfig, ExecutionOptions, FullOptions
from sae_mlops.errors import InputError
from sae_mlops.core.logit_lens import decoder_in_residual, logit_lens
from sae_mlops.core.matrices import (
    DenseWriter,
    block_neighbours,
    cooccurrence_submatrix,
    csr_count_blocks,
    dense_count_blocks,
    similarity_blocks,
    similarity_submatrix,
    write_neighbours,
)
from sae_mlops.core.results import AnalysisResult
from sae_mlops.outputs import full_reports as full_writers
from sae_mlops.outputs import plots
from sae_mlops.files import atomic_write_text
from sae_mlops.outputs.summaries import timestamp

if TYPE_CHECKING:
    from sae_mlops.analyses.sharding import PassObserver

log = logging.getLogger(__name__)


@dataclass
class FullOutputs:
    result: AnalysisResult
    files: list[Path] = field(default_factory=list)
    out_dir: Path | None = None


def vocabulary_strings(tokenizer, d_vocab: int) -> list[str]:
    """Every vocabulary entry decoded once (contexts and tables index into this list)."""
    n = min(d_vocab, len(tokenizer))
    strings = tokenizer.batch_decode([[i] for i in range(n)])
    return strings + [f"<{i}>" for i in range(n, d_vocab)]


def run_full(cfg: AnalysisConfig, out_dir: Path, opts: FullOptions | None = None, inputs: Inputs | None = None,
             exec_opts: ExecutionOptions | None = None, resume: bool = False,
             observer: PassObserver | None = None) -> FullOutputs:
    """The full analysis of ``cfg`` into ``out_dir``. ``inputs``: already prepared inputs (benchmarks
    pass their own model or SAE); None prepares them from ``cfg``. exec_opts / resume / observer: how
    the pass runs (:func:`sae_mlops.analyses.quick.run_sharded_pass`). The pass's checkpoint under
    ``out_dir/checkpoint`` is removed once every output is written."""
    exec_opts = exec_opts or ExecutionOptions()
    opts = opts or FullOptions()
    if opts.examples_per_feature < 1 or opts.context_window < 0:
        raise InputError("examples per feature must be at least 1 and the context window at least 0.")
    from sae_mlops.analyses.ray_shards import local_ray_prestarted

    out_dir = Path(out_dir)
    with local_ray_prestarted(exec_opts):  # a local Ray instance starts while the inputs load
        if inputs is None:
            inputs = prepare(cfg)
        ts = timestamp()
        sharded = run_sharded_pass(inputs, "full", out_dir, exec_opts, opts, resume=resume, observer=observer)
    stages = inputs.stages
    info = inputs.sae.info
    d_sae = info.d_sae
    dense = d_sae <= opts.dense_limit
    stats = sharded.stats
    collectors = sharded.collectors
    examples = next(c for c in collectors if isinstance(c, TopExamplesCollector))
    cooc = next((c for c in collectors if isinstance(c, CooccurrenceCollector)), None)
    if cooc is not None:  # the last buffered pairs belong to the pass's cost
        t0, c0 = time.perf_counter(), time.process_time()
        cooc.finalize_counts()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        stats.part_seconds["cooccurrence"] = stats.part_seconds.get("cooccurrence", 0.0) + dt
        stats.seconds += dt
        stats.cpu_seconds += dc
        stats.part_cpu_seconds["cooccurrence"] = stats.part_cpu_seconds.get("cooccurrence", 0.0) + dc
        inputs.stages.add("pass", dt, dc)
    result = assemble_result("full", inputs, stats, collectors)
    result.params.update({f"full_{k}": v for k, v in asdict(opts).items()})
    if opts.neighbours > d_sae - 1:  # a feature has d_sae - 1 others: what is written, not what was asked
        result.params["full_neighbours"] = d_sae - 1
        result.warnings.append(f"--neighbours {opts.neighbours} exceeds the {d_sae - 1} other features of this SAE "
                               f"(d_sae {d_sae}); {d_sae - 1} neighbours per feature are written.")
    result.params.update(sharding_params(sharded, exec_opts))
    result.metrics.update(executor_metrics(sharded))
    sparsity = next(c for c in collectors if isinstance(c, SparsityCollector))
    pf = result.per_feature
    files: list[Path] = []

    with stages.stage("database"):
        log.info("writing the activation database")
        vocab = vocabulary_strings(inputs.model.tokenizer, int(inputs.model.model.cfg.d_vocab))
        db_root = finalize_database(out_dir / "activation_database" / "activation_db", sharded.part_dirs, d_sae, pf, vocab)
        files += sorted(p for p in db_root.rglob("*") if p.is_file())

    freq = np.asarray(pf["frequency"])
    sub = plots.variable_subsample(freq, opts.heatmap_features)
    w_dec = inputs.sae.module.W_dec
    with stages.stage("matrices"):
        files += write_matrices(out_dir / "matrices", ts, w_dec, cooc, db_root, opts, dense)
        sim_sub = similarity_submatrix(w_dec, sub)
        if cooc is not None:
            counts = cooc.finalize_counts()
            fire = cooc.fire
            cooc_sub = measure_from_counts(counts[np.ix_(sub, sub)], fire[sub], fire[sub], cooc.n_tokens, opts.cooccurrence_measure)
        else:
            cooc_sub = cooccurrence_submatrix(_csr(db_root), sub, opts.cooccurrence_measure)

    with stages.stage("logit_lens"):
        log.info("logit lens")
        w_res = decoder_in_residual(w_dec, inputs.model.model, inputs.site.name, info.hook_head_index)
        lens = logit_lens(w_res, inputs.model.model.W_U, opts.logit_lens_tokens) if w_res is not None else None
        if lens is None:
            result.warnings.append(f"no logit lens for hook {inputs.site.name}: no linear path to the unembedding.")

    with stages.stage("summaries"):
        log.info("feature summaries")
        rdir = out_dir / "results"
        files.append(full_writers.write_feature_summaries(rdir / "feature_summaries.jsonl", pf, examples, vocab, lens))
        if lens is not None:
            files.append(full_writers.write_logit_lens(rdir / "logit_lens.parquet", lens, vocab))
        files.append(full_writers.write_feature_stats(rdir / "feature_stats.parquet", pf))

    with stages.stage("plots"):
        log.info("plots")
        pdir = out_dir / "plots"
        plot_files = [
            plots.training_history(info.history, pdir / "training_history.png") if info.history else None,
            plots.l0_histogram(sparsity.l0_hist.numpy(), pdir / "l0_histogram.png"),
            plots.density_histogram(freq, pdir / "feature_density.png"),
            plots.frequency_vs_mean(freq, np.asarray(pf["mean_activation"]), pdir / "frequency_vs_mean_activation.png"),
            plots.clustered_heatmap(sim_sub, sub, "Decoder cosine similarity", pdir / "similarity_heatmap.png"),
            plots.clustered_heatmap(cooc_sub, sub, f"Co-occurrence ({opts.cooccurrence_measure})", pdir / "cooccurrence_heatmap.png"),
            plots.similarity_vs_cooccurrence(sim_sub, cooc_sub, opts.cooccurrence_measure, pdir / "similarity_vs_cooccurrence.png"),
        ]
        files += [p for p in plot_files if p is not None]

    with stages.stage("reports"):
        log.info("reports")
        files.append(atomic_write_text(out_dir / "config.json", full_writers.config_json(cfg, opts)))
        files += write_block_sums(result, out_dir)
        results_path = rdir / "analysis_results.json"
        files.append(results_path)
        rel = {p.relative_to(out_dir).as_posix(): p for p in files}
        summary = full_writers.summary_dict(result, ts, pf, rel)
        files.append(atomic_write_text(out_dir / "SUMMARY.json", full_writers.dumps(summary)))
        title = f"SAE full analysis: {result.params.get('sae_name')}"
        with_images = full_writers.report_markdown(result, summary, examples, vocab, lens, out_dir, files, images=True)
        readme = full_writers.report_markdown(result, summary, examples, vocab, lens, out_dir, files)
        html = full_writers.report_html(with_images, out_dir, title)
        files.append(atomic_write_text(out_dir / "README.md", readme))
        files.append(atomic_write_text(out_dir / "README.html", html))
    # the results JSON last, so that it holds every stage's cost (its own write excepted)
    result.metrics.update(stages.metrics(inputs.device))
    result.metrics["artifacts/bytes"] = sum(p.stat().st_size for p in files if p.exists())
    atomic_write_text(results_path, result.to_json())
    sharded.checkpoint.remove()
    return FullOutputs(result, files, out_dir)


def _csr(db_root: Path):
    from sae_mlops.outputs.activation_db.reader import ActivationDB

    return ActivationDB(db_root).csr()


def write_matrices(mdir: Path, ts: str, w_dec, cooc: CooccurrenceCollector | None, db_root: Path,
                   opts: FullOptions, dense: bool) -> list[Path]:
    """Neighbour lists (always) and dense matrices (``dense``) of decoder similarity and
    co-occurrence, each in one sweep over row blocks (see :mod:`sae_mlops.core.matrices`)."""
    d_sae = int(w_dec.shape[0])
    log.info("decoder similarity")
    files = _sweep(mdir, "similarity", similarity_blocks(w_dec), d_sae, opts.neighbours, dense, nan=False)
    log.info("co-occurrence (%s)", opts.cooccurrence_measure)
    if cooc is not None:
        blocks = dense_count_blocks(cooc.finalize_counts(), cooc.fire, cooc.n_tokens, opts.cooccurrence_measure)
    else:
        blocks = csr_count_blocks(_csr(db_root), opts.cooccurrence_measure)
    nan = opts.cooccurrence_measure == "pmi"
    return files + _sweep(mdir, "cooccurrence", blocks, d_sae, opts.neighbours, dense, nan=nan)


def _sweep(mdir: Path, name: str, blocks, d_sae: int, neighbours: int, dense: bool, nan: bool) -> list[Path]:
    """One sweep over the row blocks of a matrix: ``<name>_neighbours.parquet`` always, and the dense
    ``feature_<name>.npy`` when ``dense`` (written block by block; removed if the sweep fails)."""
    files: list[Path] = []
    sink = DenseWriter(mdir / f"feature_{name}.npy", d_sae) if dense else None
    try:
        idx, val = block_neighbours(blocks, d_sae, neighbours, sink, nan=nan)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if sink is not None:
        files.append(sink.close())
    files.append(write_neighbours(mdir / f"{name}_neighbours.parquet", idx, val))
    return files
