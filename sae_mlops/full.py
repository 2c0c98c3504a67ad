"""Full analysis: the quick pass plus per-feature examples, co-occurrence counts and the activation
database, all collected in the same single pass; then matrices, logit lens, summaries, plots, reports.

Everything after the pass works from collected results and the SAE/unembedding weights, never from
the corpus again (co-occurrence beyond the dense limit reads the activation database's CSR).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sae_mlops.actdb.writer import ActivationDBWriter
from sae_mlops.analysis import assemble_result, base_collectors, prepare, run_pass
from sae_mlops.collectors.cooccurrence import MEASURES, CooccurrenceCollector, measure_from_counts, neighbours_from_csr
from sae_mlops.collectors.examples import TopExamplesCollector
from sae_mlops.collectors.sparsity import SparsityCollector
from sae_mlops.config import AnalysisConfig
from sae_mlops.errors import InputError
from sae_mlops.logit_lens import decoder_in_residual, logit_lens
from sae_mlops.matrices import (
    block_neighbours,
    dense_row_blocks,
    similarity_blocks,
    unit_rows,
    write_dense_blocks,
    write_neighbours,
)
from sae_mlops.results import AnalysisResult
from sae_mlops.writers import full as full_writers
from sae_mlops.writers import plots
from sae_mlops.writers.files import atomic_write_text
from sae_mlops.writers.quick import timestamp

log = logging.getLogger(__name__)


@dataclass
class FullOptions:
    """What the full analysis adds to quick, and its sizes.

    examples_per_feature: top-k activating examples kept per feature.
    context_window: tokens either side of an example in its context string.
    cooccurrence_measure: correlation (phi), jaccard or pmi.
    dense_limit: largest d_sae for which dense d_sae x d_sae .npy matrices are written.
    neighbours: neighbours per feature in the Parquet neighbour lists (always written).
    logit_lens_tokens: top and bottom tokens per feature.
    heatmap_features: features in the clustered heatmaps (the most variable ones).
    shard_rows: rows per Parquet shard of the activation database.
    """

    examples_per_feature: int = 25
    context_window: int = 10
    cooccurrence_measure: str = "correlation"
    dense_limit: int = 16384
    neighbours: int = 32
    logit_lens_tokens: int = 10
    heatmap_features: int = 200
    shard_rows: int = 500_000


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


def run_full(cfg: AnalysisConfig, out_dir: Path, opts: FullOptions | None = None) -> FullOutputs:
    opts = opts or FullOptions()
    if opts.cooccurrence_measure not in MEASURES:
        raise InputError(f"unknown co-occurrence measure '{opts.cooccurrence_measure}'; use one of {', '.join(MEASURES)}.")
    if opts.examples_per_feature < 1 or opts.context_window < 0:
        raise InputError("examples per feature must be at least 1 and the context window at least 0.")
    inputs = prepare(cfg)
    out_dir = Path(out_dir)
    ts = timestamp()
    info = inputs.sae.info
    d_sae = info.d_sae
    dense = d_sae <= opts.dense_limit

    collectors = base_collectors(inputs)
    examples = TopExamplesCollector(d_sae, opts.examples_per_feature, opts.context_window)
    cooc = CooccurrenceCollector(d_sae) if dense else None
    db = ActivationDBWriter(out_dir / "activation_database" / "activation_db", d_sae, opts.shard_rows)
    try:
        stats = run_pass(inputs, [*collectors, examples, *([cooc] if cooc else []), db])
    except BaseException:
        db.abort()
        raise
    result = assemble_result("full", inputs, stats, collectors)
    result.params.update({f"full_{k}": v for k, v in asdict(opts).items()})
    sparsity = next(c for c in collectors if isinstance(c, SparsityCollector))
    pf = result.per_feature
    files: list[Path] = []

    log.info("writing the activation database")
    vocab = vocabulary_strings(inputs.model.tokenizer, int(inputs.model.model.cfg.d_vocab))
    db_root = db.finalize(pf, vocab)
    files += sorted(p for p in db_root.rglob("*") if p.is_file())

    log.info("decoder similarity")
    w_dec = inputs.sae.module.W_dec
    mdir = out_dir / "matrices"
    if dense:
        files.append(write_dense_blocks(mdir / "feature_similarity.npy", d_sae, similarity_blocks(w_dec)))
    files.append(write_neighbours(mdir / "similarity_neighbours.parquet", *block_neighbours(similarity_blocks(w_dec), d_sae, opts.neighbours)))

    log.info("co-occurrence (%s)", opts.cooccurrence_measure)
    fire = np.asarray(pf["firing_count"])
    if dense:
        cooc_matrix = cooc.matrix(opts.cooccurrence_measure)
        files.append(write_dense_blocks(mdir / "feature_cooccurrence.npy", d_sae, dense_row_blocks(cooc_matrix)))
        idx, val = block_neighbours(dense_row_blocks(cooc_matrix), d_sae, opts.neighbours)
    else:
        from sae_mlops.actdb.reader import ActivationDB

        idx, val = neighbours_from_csr(ActivationDB(db_root).csr(), opts.neighbours, opts.cooccurrence_measure)
        cooc_matrix = None
    files.append(write_neighbours(mdir / "cooccurrence_neighbours.parquet", idx, val))

    log.info("logit lens")
    w_res = decoder_in_residual(w_dec, inputs.model.model, inputs.site.name, info.hook_head_index)
    lens = logit_lens(w_res, inputs.model.model.W_U, opts.logit_lens_tokens) if w_res is not None else None
    if lens is None:
        result.warnings.append(f"no logit lens for hook {inputs.site.name}: no linear path to the unembedding.")

    log.info("feature summaries")
    rdir = out_dir / "results"
    files.append(full_writers.write_feature_summaries(rdir / "feature_summaries.jsonl", pf, examples, vocab, lens))
    if lens is not None:
        files.append(full_writers.write_logit_lens(rdir / "logit_lens.parquet", lens, vocab))
    files.append(full_writers.write_feature_stats(rdir / "feature_stats.parquet", pf))

    log.info("plots")
    pdir = out_dir / "plots"
    freq = np.asarray(pf["frequency"])
    sub = plots.variable_subsample(freq, opts.heatmap_features)
    u = unit_rows(w_dec)[sub]
    sim_sub = (u @ u.T).numpy()
    if cooc_matrix is not None:
        cooc_sub = cooc_matrix[np.ix_(sub, sub)]
    else:
        from sae_mlops.actdb.reader import ActivationDB

        b = ActivationDB(db_root).csr()[:, sub]
        b.data[:] = 1
        cooc_sub = measure_from_counts((b.T @ b).toarray(), fire[sub], fire[sub], stats.tokens_analysed, opts.cooccurrence_measure)
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

    log.info("reports")
    files.append(atomic_write_text(rdir / "analysis_results.json", result.to_json()))
    files.append(atomic_write_text(out_dir / "config.json", full_writers.config_json(cfg, opts)))
    rel = {p.relative_to(out_dir).as_posix(): p for p in files}
    summary = full_writers.summary_dict(result, ts, pf, rel)
    files.append(atomic_write_text(out_dir / "SUMMARY.json", full_writers.dumps(summary)))
    report = [result, summary, examples, vocab, lens, out_dir, files]
    html = full_writers.report_html(full_writers.report_markdown(*report, images=True), out_dir, f"SAE full analysis: {result.params.get('sae_name')}")
    files.append(atomic_write_text(out_dir / "README.md", full_writers.report_markdown(*report)))
    files.append(atomic_write_text(out_dir / "README.html", html))
    return FullOutputs(result, files, out_dir)
