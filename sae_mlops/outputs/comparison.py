"""Comparison of analyses: Pareto frontiers, the table (CSV + Markdown) and the Pareto plots.

Pure functions of a pandas DataFrame with one row per analysis run (built by
`sae_mlops.tracking.compare`); no MLflow here.

Pareto frontier (lower L0 and higher quality are better): a point is on the frontier when no other
point has L0 <= its L0 and quality >= its quality with at least one of the two strictly better.
Rows whose L0 or quality is missing are never on it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sae_mlops.metrics import BY_SHORT, lookup  # noqa: E402
from sae_mlops.files import atomic_write, atomic_write_text  # noqa: E402

#: (column, header, format) of the table, in order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("kind", "kind", "{}"),
    ("sae_name", "SAE", "{}"),
    ("sae_hash", "hash", "{}"),
    ("architecture", "architecture", "{}"),
    ("d_sae", "d_sae", "{:.0f}"),
    ("k", "k", "{:.0f}"),
    ("l0", "L0", BY_SHORT["l0"].fmt),
    ("loss_recovered", "loss recovered", BY_SHORT["loss_recovered"].fmt),
    ("explained_variance", "explained variance", BY_SHORT["explained_variance"].fmt),
    ("dead_fraction", "dead fraction", BY_SHORT["dead_fraction"].fmt),
    ("ce_clean", "CE clean", BY_SHORT["ce_clean"].fmt),
    ("ce_sae", "CE SAE", BY_SHORT["ce_sae"].fmt),
    ("ce_zero", "CE zero", BY_SHORT["ce_zero"].fmt),
    ("kl_sae", "KL SAE", BY_SHORT["kl_sae"].fmt),
    ("probe_acc_k1", "probe acc k=1", "{:.3f}"),
    ("probe_acc_k5", "probe acc k=5", "{:.3f}"),
    ("absorption", "absorption", "{:.3f}"),
    ("autointerp", "autointerp", "{:.3f}"),
    ("tokens", "tokens", "{:.0f}"),
    ("model", "registered model", "{}"),
    ("pareto_loss_recovered", "frontier (LR)", "{}"),
    ("pareto_explained_variance", "frontier (EV)", "{}"),
    ("run_id", "run id", "{}"),
)

PLOTS = (
    ("loss_recovered", "loss recovered", "pareto_l0_vs_loss_recovered.png"),
    ("explained_variance", "explained variance", "pareto_l0_vs_explained_variance.png"),
)


def pareto_mask(l0: Any, quality: Any) -> np.ndarray:
    """Boolean mask of the points on the frontier of low `l0` and high `quality` (see module doc)."""
    x = np.asarray(l0, dtype=float)
    y = np.asarray(quality, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = others & (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        mask[i] = not dominated.any()
    return mask


def add_frontiers(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with boolean columns ``pareto_loss_recovered`` and ``pareto_explained_variance``."""
    out = df.copy()
    for column, _, _ in PLOTS:
        values = out[column] if column in out else pd.Series([np.nan] * len(out), index=out.index)
        out[f"pareto_{column}"] = pareto_mask(out["l0"], values)
    return out


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def table_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the comparison table (``value ± half-width`` where the row has
    the column's interval bounds ``<column>_low`` / ``<column>_high``)."""
    cols = [(c, h, f) for c, h, f in COLUMNS if c in df.columns]
    rows = []
    for _, row in df.iterrows():
        cells = []
        for c, _, f in cols:
            cell = _cell(row[c], f)
            lo, hi = row.get(f"{c}_low"), row.get(f"{c}_high")
            if cell and isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
                cell += " ± " + _cell((hi - lo) / 2.0, f)
            cells.append(cell)
        rows.append(cells)
    return [h for _, h, _ in cols], rows


def markdown_table(df: pd.DataFrame) -> str:
    headers, rows = table_rows(df)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


VERDICT_COLUMNS = ("variant", "metric", "reference value", "variant value", "difference", "95 % interval",
                   "p (Holm)", "verdict", "bound", "paired", "reference")


def verdict_cells(v: Any) -> list[str]:
    """One verdict (`sae_mlops.core.verdicts.Verdict`) as the cells of :data:`VERDICT_COLUMNS`."""
    m = lookup(v.metric)
    f = m.format if m is not None else (lambda x: f"{x:.4g}")
    interval = f"{f(v.low)} to {f(v.high)}" if math.isfinite(v.low) and math.isfinite(v.high) else "n/a"
    diff = f"{'+' if v.diff > 0 else ''}{f(v.diff)}" if math.isfinite(v.diff) else "n/a"
    p = "n/a" if not math.isfinite(v.p_holm) else ("<0.001" if v.p_holm < 0.001 else f"{v.p_holm:.3f}")
    floor = f" (seed floor {f(v.seed_floor)})" if v.seed_floor is not None else ""
    return [v.variant, v.label, f(v.reference_value), f(v.variant_value), diff, interval, p, v.verdict,
            v.bound + floor, "yes" if v.paired else "no", v.reference]


def verdict_markdown(verdicts: list[Any], note: str) -> str:
    """The verdict table in Markdown, after the note saying how it was reached."""
    lines = ["## Verdicts", "", note, "", "| " + " | ".join(VERDICT_COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in VERDICT_COLUMNS) + "|"]
    for v in verdicts:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in verdict_cells(v)) + " |")
    return "\n".join(lines) + "\n"


def write_verdicts(verdicts: list[Any], out_dir: Path) -> Path:
    """``verdicts.csv``: one row per (variant, metric) with the raw numbers."""
    frame = pd.DataFrame([v.to_dict() for v in verdicts])
    return atomic_write(Path(out_dir) / "verdicts.csv", lambda p: frame.to_csv(p, index=False))


def write_comparison(df: pd.DataFrame, out_dir: Path, title: str = "SAE comparison", context: str = "",
                     verdicts: list[Any] | None = None, verdict_note: str = "") -> list[Path]:
    """Write ``comparison.csv``, ``comparison.md``, the two Pareto plots (95 % intervals as error bars
    where the analyses have them) and ``comparison.html`` (the markdown with the plots embedded; also
    as ``README.html``) under `out_dir`; with ``verdicts``, also ``verdicts.csv`` / ``verdicts.md``
    and the verdict table in both pages."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [atomic_write(out_dir / "comparison.csv", lambda p: df.to_csv(p, index=False))]
    md = [f"# {title}", ""]
    if context:
        md += [context, ""]
    if verdicts:
        vmd = verdict_markdown(verdicts, verdict_note)
        files.append(write_verdicts(verdicts, out_dir))
        files.append(atomic_write_text(out_dir / "verdicts.md", f"# {title}: verdicts\n\n" + vmd))
        md += [vmd, ""]
    elif verdict_note:
        md += [verdict_note, ""]
    md += [
        "## Analyses",
        "",
        "Lower L0 and higher quality are better; `frontier` marks the Pareto-optimal analyses; ± is the",
        "half-width of each analysis's own 95 % interval (token-sample noise).",
        "Loss recovered = 1 - (CE_SAE - CE_clean) / (CE_zero - CE_clean); explained variance is per",
        "dimension about the mean (see `sae_mlops.core.results`).",
        "",
        markdown_table(df),
    ]
    for _, label, name in PLOTS:
        md.append(f"![L0 vs {label}]({name})")
    text = "\n".join(md) + "\n"
    files.append(atomic_write_text(out_dir / "comparison.md", text))
    for column, label, name in PLOTS:
        files.append(pareto_plot(df, column, label, out_dir / name))
    # the same page with the plots embedded: MLflow's artifact viewer shows no markdown images
    from sae_mlops.outputs.full_reports import report_html

    html = report_html(text, out_dir, title)
    files.append(atomic_write_text(out_dir / "comparison.html", html))
    files.append(atomic_write_text(out_dir / "README.html", html))
    return files


# Label offsets tried in turn (points): right, above, below, left, then further out.
_OFFSETS = ((5, 3), (5, -9), (-5, 3), (-5, -9), (5, 12), (5, -18), (-5, 12), (-5, -18), (12, 22), (12, -28), (-12, 22), (-12, -28))


def place_labels(fig: Any, ax: Any, points: list[tuple[float, float, str]], fontsize: int = 7) -> list[Any]:
    """Annotate each (x, y, text) at the first offset of `_OFFSETS` whose box overlaps neither an
    earlier label nor a marker; if none is free, the least-overlapping one.
    Greedy, in order of decreasing y, measured with the figure's renderer."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    markers = [ax.transData.transform((px, py)) for px, py, _ in points]
    taken: list[Any] = []
    for px, py, text in sorted(points, key=lambda t: -t[1]):
        best, best_cost = None, None
        for dx, dy in _OFFSETS:
            ann = ax.annotate(text, (px, py), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha="left" if dx > 0 else "right")
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            cost = sum(box.overlaps(b) for b in taken) + sum(box.contains(mx, my) for mx, my in markers)
            cost += 0 if ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1) else 0.5
            if best is None or cost < best_cost:
                if best is not None:
                    best.remove()
                best, best_cost, best_box = ann, cost, box
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append(best_box)
        placed.append(best)
    return placed


def _errors(df: pd.DataFrame, column: str, values: np.ndarray) -> np.ndarray | None:
    """[2, n] distances from each value to its interval bounds (``<column>_low`` / ``_high``; 0 where
    a row has none), for ``errorbar``; None when no row has bounds."""
    if f"{column}_low" not in df or f"{column}_high" not in df:
        return None
    lo = df[f"{column}_low"].to_numpy(dtype=float)
    hi = df[f"{column}_high"].to_numpy(dtype=float)
    if not np.isfinite(lo).any():
        return None
    return np.vstack([np.nan_to_num(values - lo, nan=0.0).clip(min=0), np.nan_to_num(hi - values, nan=0.0).clip(min=0)])


def pareto_plot(df: pd.DataFrame, column: str, label: str, path: Path) -> Path:
    """Scatter of L0 (x) against `column` (y), the Pareto frontier drawn as a step line."""
    x = df["l0"].to_numpy(dtype=float) if "l0" in df else np.array([])
    y = df[column].to_numpy(dtype=float) if column in df else np.full(len(x), np.nan)
    on = pareto_mask(x, y)
    ok = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if ok.any():
        xerr, yerr = _errors(df, "l0", x), _errors(df, column, y)
        if xerr is not None or yerr is not None:
            ax.errorbar(x[ok], y[ok], xerr=None if xerr is None else xerr[:, ok], yerr=None if yerr is None else yerr[:, ok],
                        fmt="none", ecolor="tab:gray", elinewidth=1, capsize=2, alpha=0.8, label="95 % interval")
        ax.scatter(x[ok & ~on], y[ok & ~on], color="tab:gray", alpha=0.7, label="analysis")
        ax.scatter(x[on], y[on], color="tab:red", zorder=3, label="Pareto frontier")
        order = np.argsort(x[on])
        ax.step(x[on][order], y[on][order], where="post", color="tab:red", alpha=0.6)
        if x[ok].min() > 0 and x[ok].max() / x[ok].min() > 20:
            ax.set_xscale("log")
        names = df["label"].tolist() if "label" in df else [str(i) for i in range(len(df))]
        place_labels(fig, ax, [(float(x[i]), float(y[i]), str(names[i])[:32]) for i in np.flatnonzero(ok)])
    else:
        ax.text(0.5, 0.5, f"no analysis has both L0 and {label}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("L0 (mean active features per token; lower is sparser)")
    ax.set_ylabel(f"{label} (higher is better)")
    ax.set_title(f"L0 vs {label}")
    ax.grid(alpha=0.3)
    if ok.any():
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never over a point or label

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)
