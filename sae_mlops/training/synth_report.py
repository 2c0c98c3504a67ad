"""The synth report: across a grid of recipes trained on one synthetic world, which proxy metrics track
the ground truth, and would they have picked the recipe that recovers the most true features.

For each proxy ``p`` (`sae_mlops.metrics.SYNTH_PROXIES`: explained variance, MSE, cosine, L0, dead
fraction, shrinkage, final training loss) and each truth ``t`` (MCC, mean F1) over the ``n`` recipes:

- ``rho`` = Spearman's rank correlation of ``p`` and ``t`` (``scipy.stats.spearmanr``; ties get mid
  ranks); ``rho_aligned`` = ``rho`` signed by the proxy's direction in the metric registry (higher
  is better: +1, lower is better: -1, neither: +1), so that ``rho_aligned > 0`` means "better by the
  proxy goes with better by the truth".
- its 95 % interval: ``scipy.stats.bootstrap`` over recipes (pairs resampled together,
  ``bootstrap_resamples`` resamples, percentile method, seeded ``numpy.random.default_rng(seed)``). A
  resample whose proxy or truth values are all equal has no rank correlation; it counts as 0.
- the proxy's pick: the recipe best by the proxy (its registry direction; none for a proxy without
  one, e.g. shrinkage), its truth value, and whether it is the truth's winner.

The correlations are given over all recipes and, when the grid holds random baselines, again over
the trained recipes only (``scope`` column). Writes ``README.md`` / ``README.html`` (tables, plots
embedded), ``recipes.csv``, ``correlations.csv``,
``picks.csv`` and ``plots/*.png``. Pure functions of the results table: no model, no MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sae_mlops.metrics import BY_NAME, SYNTH_PROXIES, SYNTH_TRUTHS


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return float(spearmanr(x, y).statistic)


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when the registry says neither."""
    m = BY_NAME.get(metric)
    if m is None or m.higher_is_better is None:
        return 0
    return 1 if m.higher_is_better else -1


def correlations(table: pd.DataFrame, resamples: int = 2000, seed: int = 0, proxies: tuple[str, ...] = SYNTH_PROXIES,
                 truths: tuple[str, ...] = SYNTH_TRUTHS) -> pd.DataFrame:
    """One row per (proxy, truth): n, rho, rho_aligned, low, high (95 % bootstrap interval of rho)."""
    from scipy.stats import bootstrap

    rows = []
    for truth in truths:
        for proxy in proxies:
            if proxy not in table or truth not in table:
                continue
            sub = table[[proxy, truth]].astype(float).dropna()
            x, y = sub[proxy].to_numpy(), sub[truth].to_numpy()
            rho = _rho(x, y) if len(x) >= 3 else math.nan
            low = high = math.nan
            if len(x) >= 3:
                res = bootstrap((x, y), _rho, paired=True, vectorized=False, n_resamples=resamples,
                                confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
                low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
            sign = direction(proxy) or 1
            rows.append({"proxy": proxy, "truth": truth, "n": len(x), "rho": rho, "rho_aligned": sign * rho,
                         "low": low, "high": high})
    return pd.DataFrame(rows)


def picks(table: pd.DataFrame, truth: str = "synth/mcc", proxies: tuple[str, ...] = SYNTH_PROXIES) -> tuple[str, pd.DataFrame]:
    """The truth's winner (highest `truth`) and, per proxy, the recipe it would pick (best by its
    registry direction; empty without one), that recipe's truth value and whether it is the winner."""
    winner = str(table[truth].astype(float).idxmax())
    rows = []
    for proxy in proxies:
        if proxy not in table:
            continue
        sign = direction(proxy)
        values = table[proxy].astype(float)
        pick = "" if sign == 0 or values.isna().all() else str((values * sign).idxmax())
        rows.append({
            "proxy": proxy,
            "direction": {1: "higher", -1: "lower", 0: "neither"}[sign],
            "pick": pick,
            f"pick_{truth.split('/')[1]}": float(table.loc[pick, truth]) if pick else math.nan,
            "agrees": bool(pick == winner) if pick else None,
        })
    return winner, pd.DataFrame(rows)


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _plots(table: pd.DataFrame, corr: pd.DataFrame, plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    files = []
    proxies = [p for p in SYNTH_PROXIES if p in table]
    cols = 4
    rows = math.ceil(len(proxies) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    archs = sorted(table["architecture"].unique()) if "architecture" in table else [""]
    colours = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(archs)}
    for ax, proxy in zip(axes.ravel(), proxies, strict=False):
        for arch in archs:
            sub = table[table["architecture"] == arch] if arch else table
            base = sub["baseline"].fillna("").astype(bool) if "baseline" in sub else np.zeros(len(sub), bool)
            ax.scatter(sub.loc[~base, proxy], sub.loc[~base, "synth/mcc"], color=colours[arch], label=arch, s=22)
            if base.any():
                ax.scatter(sub.loc[base, proxy], sub.loc[base, "synth/mcc"], color=colours[arch], marker="x", s=30,
                           label=f"{arch} baseline")
        r = corr[(corr["proxy"] == proxy) & (corr["truth"] == "synth/mcc")]
        rho = f" (rho {float(r['rho'].iloc[0]):+.2f})" if len(r) else ""
        ax.set_xlabel(proxy.split("/")[1] + rho, fontsize=8)
        ax.set_ylabel("MCC", fontsize=8)
    for ax in axes.ravel()[len(proxies):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle("ground-truth MCC against each proxy (one point per recipe; x = random baseline)", fontsize=9)
    fig.tight_layout()
    path = plots / "proxies_vs_mcc.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(path)

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(corr) + 1))
    labels = [f"{p.split('/')[1]} ~ {t.split('/')[1]}" for p, t in zip(corr["proxy"], corr["truth"], strict=True)]
    yy = np.arange(len(corr))
    ax.errorbar(corr["rho"], yy, xerr=[corr["rho"] - corr["low"], corr["high"] - corr["rho"]], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(yy, labels, fontsize=7)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rho across recipes (95% bootstrap interval)", fontsize=8)
    fig.tight_layout()
    path = plots / "rank_correlations.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(path)
    return files


def write_report(table: pd.DataFrame, out_dir: Path, *, world: dict[str, Any], resamples: int = 2000, seed: int = 0,
                 seconds: float | None = None) -> tuple[list[Path], dict[str, float], dict[str, Any]]:
    """Write the report (see the module docstring) for the results `table` (index: recipe names;
    columns: metrics, ``architecture``, ``baseline``). Returns (files, metrics to log, facts)."""
    from sae_mlops.files import atomic_write_text
    from sae_mlops.outputs.full_reports import report_html

    out_dir.mkdir(parents=True, exist_ok=True)
    corr = correlations(table, resamples=resamples, seed=seed)
    trained = table[table["baseline"].isna()] if "baseline" in table else table
    corr_trained = correlations(trained, resamples=resamples, seed=seed) if 3 <= len(trained) < len(table) else None
    winner, pick_mcc = picks(table, "synth/mcc")
    winner_f1, pick_f1 = picks(table, "synth/f1")
    files = _plots(table, corr, out_dir / "plots")
    table.to_csv(out_dir / "recipes.csv", index_label="recipe")
    both_scopes = [corr.assign(scope="all recipes")]
    if corr_trained is not None:
        both_scopes.append(corr_trained.assign(scope="trained recipes (random baselines left out)"))
    pd.concat(both_scopes, ignore_index=True).to_csv(out_dir / "correlations.csv", index=False)
    both = [p.rename(columns={f"pick_{t}": "pick_truth_value"}).assign(truth=f"synth/{t}", winner=w)
            for p, t, w in ((pick_mcc, "mcc", winner), (pick_f1, "f1", winner_f1))]
    pd.concat(both, ignore_index=True).to_csv(out_dir / "picks.csv", index=False)
    files += [out_dir / "recipes.csv", out_dir / "correlations.csv", out_dir / "picks.csv"]

    shown = ["synth/mcc", "synth/f1", "synth/uniqueness", "synth/precision", "synth/recall", "synth/explained_variance",
             "synth/mse", "synth/cosine", "synth/l0", "synth/dead_fraction", "synth/shrinkage"]
    recipes = table[[c for c in shown if c in table]].sort_values("synth/mcc", ascending=False)
    recipes = recipes.rename(columns=lambda c: c.split("/")[1]).reset_index(names="recipe")
    def corr_table(c: pd.DataFrame) -> str:
        shown = c.assign(proxy=c["proxy"].str.split("/").str[1], truth=c["truth"].str.split("/").str[1],
                         interval=[f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(c["low"], c["high"], strict=True)])
        return _md_table(shown[["truth", "proxy", "n", "rho", "interval", "rho_aligned"]], "{:+.3f}")

    trained_lines = [] if corr_trained is None else [
        "",
        "The same over the trained recipes only (the random baselines left out: they are far worse on both the "
        "proxies and the truth, which alone can make a proxy look like it tracks the truth):",
        "",
        corr_table(corr_trained),
    ]
    agreeing = [p.split("/")[1] for p, a in zip(pick_mcc["proxy"], pick_mcc["agrees"], strict=True) if a]
    lines = [
        "# Synth report: which proxies track the ground truth",
        "",
        f"World `{world.get('digest')}`: {world.get('features')} true features in {world.get('d_model')} dims "
        f"(seed {world.get('world_seed')}); {len(table)} recipes"
        + (f"; grid wall time {seconds:.0f} s" if seconds is not None else "") + ".",
        "",
        f"**Winner on truth (MCC): `{winner}`** (MCC {float(table.loc[winner, 'synth/mcc']):.4f}); "
        f"winner on mean F1: `{winner_f1}` (F1 {float(table.loc[winner_f1, 'synth/f1']):.4f}).",
        "",
        "Proxies that would have picked the MCC winner: " + (", ".join(f"`{a}`" for a in agreeing) or "none") + ".",
        "",
        "## Rank correlation of each proxy with the truth",
        "",
        "Spearman rho across recipes with a 95 % bootstrap interval over recipes (scipy.stats.bootstrap, "
        f"{resamples} resamples, percentile). `rho_aligned` is rho signed by the proxy's direction (positive: the "
        "proxy's 'better' goes with more true features recovered).",
        "",
        corr_table(corr),
        *trained_lines,
        "",
        "![rank correlations](plots/rank_correlations.png)",
        "",
        "## Would each proxy have picked the winner?",
        "",
        _md_table(pick_mcc.assign(proxy=pick_mcc["proxy"].str.split("/").str[1])),
        "",
        "![proxies vs MCC](plots/proxies_vs_mcc.png)",
        "",
        "## Recipes (best MCC first)",
        "",
        _md_table(recipes),
        "",
        "Metric definitions: docs/guides/synth.md. Files: `recipes.csv`, `correlations.csv`, `picks.csv`, `plots/`.",
    ]
    md = "\n".join(lines) + "\n"
    files.append(atomic_write_text(out_dir / "README.md", md))
    files.append(atomic_write_text(out_dir / "README.html", report_html(md, out_dir, title="Synth report")))
    metrics = {f"synth/rho_{t.split('/')[1]}_vs_{p.split('/')[1]}": float(r)
               for p, t, r in zip(corr["proxy"], corr["truth"], corr["rho"], strict=True) if not math.isnan(r)}
    facts = {"winner_mcc": winner, "winner_f1": winner_f1, "agreeing_proxies": agreeing}
    return files, metrics, facts
