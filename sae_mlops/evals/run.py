"""Run the evals on one SAE: load it and its model once, probe and measure absorption, write the files.

Pure computation and files (the model through `sae_mlops.core.engine.Engine`); the workflows log
what this returns to MLflow. Files under the output directory:

- ``probe/probe_results.parquet`` / ``.csv``: one row per (dataset, task, representation, k);
- ``probe/probe_accuracy_vs_k.png``: test accuracy against k per dataset, SAE and raw top-k, the dense
  baseline as a line;
- ``absorption/absorption_by_letter.parquet`` / ``.csv`` and ``absorption/absorption_by_letter.png``;
- ``EVALS.md`` (the report's table) and ``evals.json`` (metrics, timings, messages).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae_mlops.config import AbsorptionOptions, EvalTarget, ProbeOptions
from sae_mlops.errors import InputError
from sae_mlops.evals.activations import DEFAULT_CACHE_DIR, CacheStats, cached_text_activations, model_fingerprint, pooled_codes

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_SIZE = 128


@dataclass
class Loaded:
    """An SAE, its model and the engine that runs the model to the SAE's hook."""

    target: EvalTarget
    sae: Any  # LoadedSAE
    model: Any  # LoadedModel
    engine: Any  # Engine
    context_size: int
    prepend_bos: bool
    device: str
    model_fp: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class EvalsResult:
    metrics: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    cache: CacheStats = field(default_factory=CacheStats)


def load_target(t: EvalTarget) -> Loaded:
    """Load SAE and model, check they fit (hook, d_in, tokenizer) and resolve context size and BOS rule
    as the analysis does."""
    from sae_mlops.core.engine import Engine, HookSite, resolve_device
    from sae_mlops.sources.model import load_model
    from sae_mlops.sources.sae import load_sae
    from sae_mlops.sources.validate import check_compatible

    device = resolve_device(t.device)
    sae = load_sae(t.sae, sae_id=t.sae_id, device=device, topk_mode=t.topk_mode, threshold=t.threshold)
    if sae.info.topk_mode == "threshold" and sae.info.threshold is None:
        raise InputError("--topk-mode threshold needs --threshold for evals (the analysis estimates it on a corpus); pass --threshold.")
    model_name = t.model or sae.info.model_name
    if not model_name:
        raise InputError(f"the SAE '{t.sae}' does not record which model it was trained on; pass --model.")
    model = load_model(model_name, device=device, dtype=t.dtype, from_pretrained_kwargs=sae.info.extra.get("model_from_pretrained_kwargs"))
    warnings = list(check_compatible(sae, model, hook_override=t.hook))
    site = HookSite.for_model(model.model, t.hook or sae.info.hook_name, sae.info.hook_head_index)
    n_ctx = int(model.model.cfg.n_ctx)
    context = min(t.context_size or sae.info.context_size or DEFAULT_CONTEXT_SIZE, n_ctx)
    bos = t.prepend_bos if t.prepend_bos is not None else sae.info.prepend_bos
    if bos is None:
        bos = bool(getattr(model.model.cfg, "default_prepend_bos", True))
    engine = Engine(model.model, sae.module, site, device=device, downstream=False)
    return Loaded(t, sae, model, engine, context, bool(bos), device, model_fingerprint(model.model), warnings)


def run_probe(loaded: Loaded, opts: ProbeOptions, out: Path, result: EvalsResult) -> None:
    """k-sparse probing of `loaded`'s SAE on every dataset of `opts` (`sae_mlops.evals.probe`)."""
    import pandas as pd

    from sae_mlops.evals.datasets import load_datasets
    from sae_mlops.evals.probe import probe_dataset, probe_metrics

    t0 = time.perf_counter()
    datasets = load_datasets(opts.datasets, opts.text_column, opts.label_column)
    cache_dir = None if opts.no_cache else Path(opts.cache_dir).expanduser() if opts.cache_dir else DEFAULT_CACHE_DIR
    rows: list[dict] = []
    for ds in datasets:
        acts = cached_text_activations(
            loaded.engine, loaded.model.tokenizer, ds.texts, ds.digest, model_fp=loaded.model_fp,
            context_size=loaded.context_size, prepend_bos=loaded.prepend_bos, pooling=opts.pooling,
            dtype=loaded.target.dtype, batch_size=loaded.target.batch_size, cache_dir=cache_dir, stats=result.cache,
        )
        codes = pooled_codes(loaded.sae.module, acts, loaded.target.batch_size, loaded.device)
        raw = acts.pooled()
        log.info("probing %s: %d texts, %d classes", ds.name, len(ds.texts), len(ds.classes))
        rows += probe_dataset(ds, codes, raw, opts.k_values(), opts.test_fraction, opts.seed)
    table = pd.DataFrame(rows)
    result.metrics.update(probe_metrics(table))
    d = out / "probe"
    d.mkdir(parents=True, exist_ok=True)
    table.to_parquet(d / "probe_results.parquet", index=False)
    table.to_csv(d / "probe_results.csv", index=False)
    result.files += [d / "probe_results.parquet", d / "probe_results.csv", plot_probe(table, d / "probe_accuracy_vs_k.png")]
    result.seconds["probe"] = time.perf_counter() - t0
    result.seconds["probe_model"] = result.cache.model_seconds


def run_absorption(loaded: Loaded, opts: AbsorptionOptions, out: Path, result: EvalsResult) -> None:
    """First-letter absorption of `loaded`'s SAE (`sae_mlops.evals.absorption`)."""
    import torch

    from sae_mlops.core.tokens import make_plan
    from sae_mlops.evals.absorption import AbsorptionSettings, absorption_eval, single_token_words, word_activations

    t0 = time.perf_counter()
    tok = loaded.model.tokenizer
    ids, words = single_token_words(tok)
    plan = make_plan(tok, loaded.context_size, loaded.prepend_bos)
    acts = word_activations(loaded.engine, ids, plan.bos_id if loaded.prepend_bos else None)
    module = loaded.sae.module
    dtype = next(iter(module.parameters())).dtype if hasattr(module, "parameters") else torch.float32

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            f = module.encode(torch.from_numpy(x).to(device=loaded.device, dtype=dtype))
            return (f.to_dense() if f.is_sparse else f).float().cpu().numpy()

    w_dec = module.W_dec.detach().float().cpu().numpy()
    settings = AbsorptionSettings(min_probe_f1=opts.absorption_min_probe_f1, min_letters=opts.absorption_min_letters,
                                  max_k=opts.absorption_max_k)
    res = absorption_eval(acts, words, encode, w_dec, settings)
    result.metrics.update(res.metrics)
    result.messages["absorption"] = res.message
    d = out / "absorption"
    d.mkdir(parents=True, exist_ok=True)
    res.table.to_parquet(d / "absorption_by_letter.parquet", index=False)
    res.table.to_csv(d / "absorption_by_letter.csv", index=False)
    result.files += [d / "absorption_by_letter.parquet", d / "absorption_by_letter.csv"]
    if res.encoded:
        result.files.append(plot_absorption(res.table, d / "absorption_by_letter.png"))
    result.seconds["absorption"] = time.perf_counter() - t0


def plot_probe(table: Any, path: Path) -> Path:
    """Test accuracy against k (log axis) per dataset: SAE top-k (solid), raw top-k (dashed), dense (dotted line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(table["dataset"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ds in enumerate(datasets):
        color = f"C{i % 10}"
        sub = table[table["dataset"] == ds]
        for rep, style in (("sae", "-o"), ("raw", "--s")):
            g = sub[sub["representation"] == rep].groupby("k")["accuracy"].mean()
            ax.plot(g.index, g.values, style, color=color, label=f"{ds} {'SAE' if rep == 'sae' else 'raw'} top-k", ms=4)
        dense = sub[sub["representation"] == "dense"]["accuracy"].mean()
        ax.axhline(dense, color=color, ls=":", lw=1, label=f"{ds} dense (all dims)")
    ax.set_xscale("log")
    ax.set_xlabel("k (latents or raw dimensions)")
    ax.set_ylabel("test accuracy (chance 0.5)")
    ax.set_title("k-sparse probing")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_absorption(table: Any, path: Path) -> Path:
    """Full absorption rate (bars) and split latents (markers) per evaluated letter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = table[table["evaluated"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(ev["letter"], ev["full_absorption_rate"], color="C0", label="full absorption rate")
    ax.set_ylabel("full absorption rate")
    ax.set_ylim(0, max(0.05, float(ev["full_absorption_rate"].max() or 0) * 1.2))
    ax2 = ax.twinx()
    ax2.plot(ev["letter"], ev["split_latents"], "o", color="C3", label="split latents")
    ax2.set_ylabel("split latents")
    ax.set_title("first-letter absorption per letter")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, pattern: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return pattern.format(v)


def write_report(result: EvalsResult, out: Path, sae: str) -> list[Path]:
    """``EVALS.md``: one table of every eval's headline figures (value and 95 % interval) and the
    per-dataset probe table; ``evals.json``: metrics, seconds, messages, cache counts."""
    m = result.metrics
    lines = [f"# Evals of {sae}", "", "| eval | metric | value | 95 % interval |", "|---|---|---|---|"]

    def row(ev: str, name: str, label: str) -> None:
        if name in m:
            lo, hi = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
            ci = f"[{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else ""
            lines.append(f"| {ev} | {label} (`{name}`) | {_fmt(m[name])} | {ci} |")

    ks = sorted({int(k.rsplit("_k", 1)[1]) for k in m if k.startswith("probe/sae_acc_k") and "_ci_" not in k})
    for k in ks:
        row("probe", f"probe/sae_acc_k{k}", f"SAE top-{k} accuracy")
    for k in ks:
        row("probe", f"probe/raw_acc_k{k}", f"raw top-{k} accuracy")
    row("probe", "probe/dense_acc", "dense baseline accuracy")
    row("absorption", "absorption/probe_accuracy", "first-letter probe accuracy")
    row("absorption", "absorption/letters_evaluated", "letters evaluated")
    row("absorption", "absorption/full_absorption_rate", "full absorption rate")
    row("absorption", "absorption/absorption_fraction", "absorption fraction")
    row("absorption", "absorption/split_latents", "split latents per letter")
    row("autointerp", "autointerp/detection_score", "detection score")
    row("autointerp", "autointerp/features_scored", "features scored")
    row("autointerp", "autointerp/features_not_scored", "features not scored")
    for ev, msg in result.messages.items():
        lines += ["", f"**{ev}**: {msg}."]
    datasets = sorted({k.split("/")[1] for k in m if k.startswith("probe/") and k.count("/") == 2})
    if datasets:
        lines += ["", "## k-sparse probing per dataset (test accuracy)", "",
                  "| dataset | " + " | ".join(f"SAE k={k}" for k in ks) + " | dense |", "|---" * (len(ks) + 2) + "|"]
        for ds in datasets:
            cells = [_fmt(m.get(f"probe/{ds}/sae_acc_k{k}")) for k in ks] + [_fmt(m.get(f"probe/{ds}/dense_acc"))]
            lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()),
              f"Activation cache: {result.cache.hits} hit(s), {result.cache.misses} miss(es)."]
    md = out / "EVALS.md"
    md.write_text("\n".join(lines) + "\n")
    js = out / "evals.json"
    js.write_text(json.dumps({"metrics": {k: (v if math.isfinite(v) else None) for k, v in m.items()}, "seconds": result.seconds,
                              "messages": result.messages, "cache": {"hits": result.cache.hits, "misses": result.cache.misses}}, indent=2))
    return [md, js]
