"""Figures for the interpretation analyses: each takes the data a function in
:mod:`sae_mlops.interp` returned and gives back a :class:`matplotlib.figure.Figure`.

Figures are built without pyplot (no global figure registry, no backend needed), so they neither
pile up in memory nor show twice in a notebook; :func:`show` displays one as a PNG in IPython and
:func:`fig_to_png` gives its bytes.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from sae_mlops.interp.density import LABELS

_LABEL_COLOURS = {"interpretable": "#2e7d32", "medium": "#f9a825", "polysemantic": "#c62828", "no_examples": "#9e9e9e"}


def fig_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def figure_title(fig: Figure) -> str:
    """The figure's suptitle, else its axes titles joined (used as the image's alt text)."""
    suptitle = getattr(fig, "_suptitle", None)  # matplotlib keeps it private; absent when none was set
    sup = suptitle.get_text() if suptitle is not None else ""
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    return sup or "; ".join(titles) or "figure"


def show(fig: Figure, dpi: int = 100) -> None:
    """Display a figure as a PNG image in IPython / Jupyter (works whatever the matplotlib backend);
    its title becomes the image's alt text."""
    from IPython.display import Image, display

    display(Image(data=fig_to_png(fig, dpi), alt=figure_title(fig)))


def _fig(w: float = 6.0, h: float = 4.0, ncols: int = 1):
    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def frequency_vs_mean(table: pd.DataFrame) -> Figure:
    """Firing fraction (log x) against mean activation when firing, one point per feature."""
    fig, ax = _fig(6, 4)
    t = table[table["firing_fraction"] > 0]
    ax.scatter(t["firing_fraction"], t["mean_activation"], s=6, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("firing fraction")
    ax.set_ylabel("mean activation when firing")
    ax.set_title(f"Frequency vs mean activation ({len(t)} features)")
    return fig


def top_features(top: pd.DataFrame, by: str) -> Figure:
    """Horizontal bars of ``by`` for the rows of a :func:`sae_mlops.interp.features.top_features` table."""
    fig, ax = _fig(6, 0.6 + 0.3 * max(len(top), 1))
    labels = [f"{int(f)}  {t!r}" if t is not None else str(int(f)) for f, t in zip(top["feature"], top.get("top_token", [None] * len(top)), strict=True)]
    ax.barh(range(len(top)), top[by], color="#1565c0")
    ax.set_yticks(range(len(top)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(by)
    ax.set_title(f"Top features by {by}")
    return fig


def token_counts(counts: pd.DataFrame, feature: int, n: int = 15) -> Figure:
    """Counts of the most common trigger tokens among a feature's top examples."""
    c = counts.head(n)
    fig, ax = _fig(5.5, 0.6 + 0.28 * max(len(c), 1))
    ax.barh(range(len(c)), c["count"], color="#6a1b9a")
    ax.set_yticks(range(len(c)), [repr(t) for t in c["token"]], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("top examples")
    ax.set_title(f"Feature {feature}: trigger tokens")
    return fig


def position_histogram(counts: np.ndarray, edges: np.ndarray, feature: int) -> Figure:
    """Bars of a :func:`sae_mlops.interp.features.position_histogram` result."""
    fig, ax = _fig(5.5, 3.2)
    if len(counts):
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#00838f")
    ax.set_xlabel("position in document")
    ax.set_ylabel("top examples")
    ax.set_title(f"Feature {feature}: positions of top examples")
    return fig


def token_density(density: pd.DataFrame, t1: float = 0.9, t3: float = 0.9) -> Figure:
    """Left: features per label. Right: top-1 share against top-3 share with the thresholds."""
    fig, (a, b) = _fig(10, 4, ncols=2)
    counts = density["label"].value_counts().reindex(list(LABELS), fill_value=0)
    a.bar(counts.index, counts.values, color=[_LABEL_COLOURS[k] for k in counts.index])
    a.set_ylabel("features")
    a.set_title("Token-density labels")
    a.tick_params(axis="x", labelsize=8)
    for label in LABELS[:3]:
        d = density[density["label"] == label]
        b.scatter(d["top1_share"], d["top3_share"], s=8, alpha=0.6, color=_LABEL_COLOURS[label], label=label)
    b.axvline(t1, color="black", linestyle="--", linewidth=0.8)
    b.axhline(t3, color="black", linestyle=":", linewidth=0.8)
    b.set_xlabel("top-1 token share")
    b.set_ylabel("top-3 token share")
    b.set_title(f"Shares (t1={t1:g}, t3={t3:g})")
    b.legend(fontsize=8)
    return fig


def clustered_heatmap(matrix: np.ndarray, features: np.ndarray, title: str) -> Figure:
    """A (pre-ordered) pair matrix as a diverging heatmap; unknown pairs grey."""
    fig, ax = _fig(6.5, 5.5)
    m = np.ma.masked_invalid(np.asarray(matrix, dtype=np.float64))
    lim = float(np.abs(m).max()) if m.count() else 1.0
    cmap = colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    im = ax.imshow(m, cmap=cmap, vmin=-(lim or 1.0), vmax=lim or 1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"{title} ({len(features)} features, clustered)")
    if len(features) <= 40:
        ax.set_xticks(range(len(features)), [str(int(f)) for f in features], rotation=90, fontsize=6)
        ax.set_yticks(range(len(features)), [str(int(f)) for f in features], fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def similarity_vs_cooccurrence(pairs: pd.DataFrame, measure: str = "correlation") -> Figure:
    """Decoder cosine similarity against co-occurrence, one point per feature pair."""
    fig, ax = _fig(6, 4)
    ax.scatter(pairs["similarity"], pairs["cooccurrence"], s=3, alpha=0.3)
    if len(pairs) > 2:
        r = np.corrcoef(pairs["similarity"], pairs["cooccurrence"])[0, 1]
        ax.text(0.02, 0.96, f"Pearson r = {r:.3f} ({len(pairs):,} pairs)", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xlabel("decoder cosine similarity")
    ax.set_ylabel(f"co-occurrence ({measure})")
    ax.set_title("Similarity vs co-occurrence")
    return fig


def cluster_sizes(clusters: list[np.ndarray]) -> Figure:
    """Sizes of the high co-occurrence clusters, largest first."""
    fig, ax = _fig(6, 3)
    sizes = [len(c) for c in clusters]
    ax.bar(range(len(sizes)), sizes, color="#37474f")
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("features")
    ax.set_title(f"High co-occurrence clusters ({len(sizes)})")
    return fig


def inside_outside(cooc_pairs: pd.DataFrame, sim_pairs: pd.DataFrame | None = None, measure: str = "correlation") -> Figure:
    """Normalised histograms of pair values inside vs outside a cluster (co-occurrence, and
    similarity when given)."""
    panels = [(cooc_pairs, f"co-occurrence ({measure})")] + ([(sim_pairs, "decoder cosine similarity")] if sim_pairs is not None else [])
    fig, axes = _fig(5 * len(panels), 3.6, ncols=len(panels))
    axes = np.atleast_1d(axes)
    for ax, (pairs, name) in zip(axes, panels, strict=True):
        values = pairs["value"].to_numpy(dtype=np.float64)
        bins = np.linspace(values.min(), values.max(), 40) if values.size and values.min() < values.max() else 10
        for where, colour in (("outside", "#90a4ae"), ("inside", "#d84315")):
            v = pairs.loc[pairs["where"] == where, "value"]
            if len(v):
                ax.hist(v, bins=bins, density=True, alpha=0.6, color=colour, label=f"{where} ({len(v):,} pairs)")
        ax.set_xlabel(name)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle("Inside vs outside the cluster")
    return fig


def frequency_vs_cooccurrence(frame: pd.DataFrame) -> Figure:
    """Per member: firing fraction against mean co-occurrence inside (and max outside)."""
    fig, ax = _fig(6, 4)
    ax.scatter(frame["frequency"], frame["mean_cooccurrence_inside"], s=18, color="#d84315", label="mean inside")
    ax.scatter(frame["frequency"], frame["max_cooccurrence_outside"], s=18, marker="x", color="#546e7a", label="max outside")
    for r in frame.itertuples():
        ax.annotate(str(int(r.feature)), (r.frequency, r.mean_cooccurrence_inside), fontsize=6, alpha=0.7)
    if (frame["frequency"] > 0).all() and len(frame):
        ax.set_xscale("log")
    ax.set_xlabel("firing fraction")
    ax.set_ylabel("co-occurrence")
    ax.set_title("Activation frequency vs co-occurrence (cluster members)")
    ax.legend(fontsize=8)
    return fig


def decoder_norms(norms: pd.DataFrame) -> Figure:
    """Histogram of decoder row norms, cluster members against all features."""
    fig, ax = _fig(6, 3.6)
    values = norms["norm"].to_numpy()
    bins = np.linspace(values.min(), values.max(), 40) if values.min() < values.max() else 10
    ax.hist(values, bins=bins, density=True, alpha=0.5, color="#90a4ae", label=f"all ({len(norms)})")
    inside = norms.loc[norms["in_cluster"], "norm"]
    ax.hist(inside, bins=bins, density=True, alpha=0.7, color="#d84315", label=f"cluster ({len(inside)})")
    ax.set_xlabel("||W_dec[i]||")
    ax.set_ylabel("density")
    ax.set_title("Decoder norms")
    ax.legend(fontsize=8)
    return fig


def decoder_pca(frame: pd.DataFrame, ratio: np.ndarray) -> Figure:
    """First two principal components of decoder rows, cluster members highlighted."""
    fig, ax = _fig(5.5, 5)
    out, inn = frame[~frame["in_cluster"]], frame[frame["in_cluster"]]
    y = "pc2" if "pc2" in frame else "pc1"
    ax.scatter(out["pc1"], out[y], s=5, alpha=0.3, color="#90a4ae", label="other features")
    ax.scatter(inn["pc1"], inn[y], s=25, color="#d84315", label="cluster")
    for r in inn.itertuples():
        ax.annotate(str(int(r.feature)), (r.pc1, getattr(r, y)), fontsize=6)
    ax.set_xlabel(f"PC1 ({ratio[0]:.1%})" if len(ratio) else "PC1")
    ax.set_ylabel(f"PC2 ({ratio[1]:.1%})" if len(ratio) > 1 else "PC2")
    ax.set_title("PCA of decoder rows")
    ax.legend(fontsize=8)
    return fig


def interaction_network(edges: pd.DataFrame, layout: dict[int, tuple[float, float]], title: str = "Interaction network") -> Figure:
    """Nodes at ``layout``; edges drawn with width and colour by co-occurrence."""
    fig, ax = _fig(6, 6)
    if len(edges):
        w = edges["cooccurrence"].to_numpy(dtype=np.float64)
        lo, hi = float(w.min()), float(w.max())
        norm = (w - lo) / (hi - lo) if hi > lo else np.ones_like(w)
        cmap = colormaps["viridis"]
        for e, x in zip(edges.itertuples(), norm, strict=True):
            (x0, y0), (x1, y1) = layout[int(e.source)], layout[int(e.target)]
            ax.plot([x0, x1], [y0, y1], color=cmap(x), linewidth=0.5 + 3 * x, alpha=0.7, zorder=1)
    xy = np.array(list(layout.values())) if layout else np.zeros((0, 2))
    ax.scatter(xy[:, 0], xy[:, 1], s=220, color="#fff3e0", edgecolor="#d84315", zorder=2)
    for node, (x, y) in layout.items():
        ax.text(x, y, str(node), ha="center", va="center", fontsize=7, zorder=3)
    ax.set_axis_off()
    ax.set_title(f"{title} ({len(layout)} features, {len(edges)} edges)")
    return fig


def position_zero(shares: pd.DataFrame, hits: pd.DataFrame, min_share: float = 0.5) -> Figure:
    """Left: share of top examples at the start, over all features. Right: the flagged features'
    firing fraction."""
    fig, (a, b) = _fig(10, 3.6, ncols=2)
    a.hist(shares.loc[shares["n_examples"] > 0, "share"], bins=np.linspace(0, 1, 21), color="#00838f")
    a.axvline(min_share, color="black", linestyle="--", linewidth=0.8)
    a.set_yscale("log")
    a.set_xlabel("share of top examples at the start")
    a.set_ylabel("features")
    a.set_title("Start-of-document share")
    h = hits.head(30)
    b.bar(range(len(h)), h["activation_frequency"], color="#00838f")
    b.set_xticks(range(len(h)), [str(int(f)) for f in h["feature"]], rotation=90, fontsize=7)
    b.set_ylabel("tokens fired on")
    b.set_title(f"Position-0 features ({len(hits)})")
    return fig
