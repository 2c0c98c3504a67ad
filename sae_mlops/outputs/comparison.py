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

from sae_mlops.metrics import BY_SHORT  # noqa: E402
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
    """Headers and formatted cells of the comparison table."""
    cols = [(c, h, f) for c, h, f in COLUMNS if c in df.columns]
    rows = [[_cell(row[c], f) for c, _, f in cols] for _, row in df.iterrows()]
    return [h for _, h, _ in cols], rows


def markdown_table(df: pd.DataFrame) -> str:
    headers, rows = table_rows(df)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_comparison(df: pd.DataFrame, out_dir: Path, title: str = "SAE comparison", context: str = "") -> list[Path]:
    """Write ``comparison.csv``, ``comparison.md``, the two Pareto plots and ``comparison.html`` (the
    markdown with the plots embedded) under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [atomic_write(out_dir / "comparison.csv", lambda p: df.to_csv(p, index=False))]
    md = [f"# {title}", ""]
    if context:
        md += [context, ""]
    md += [
        "Lower L0 and higher quality are better; `frontier` marks the Pareto-optimal analyses.",
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

    files.append(atomic_write_text(out_dir / "comparison.html", report_html(text, out_dir, title)))
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


def pareto_plot(df: pd.DataFrame, column: str, label: str, path: Path) -> Path:
    """Scatter of L0 (x) against `column` (y), the Pareto frontier drawn as a step line."""
    x = df["l0"].to_numpy(dtype=float) if "l0" in df else np.array([])
    y = df[column].to_numpy(dtype=float) if column in df else np.full(len(x), np.nan)
    on = pareto_mask(x, y)
    ok = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if ok.any():
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
