"""Plots (PNG, headless Agg backend). Each function takes arrays and a path and writes one figure.

Heatmaps are drawn on a subsample of features (the most variable by firing, p(1 - p)), reordered
by average-linkage hierarchical clustering so that blocks of related features show.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sae_mlops.files import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)


def training_history(history: dict[str, list[float]], path: Path) -> Path | None:
    """Loss, reconstruction, L1 and L0 per epoch (with validation twins when present)."""
    panels = [k for k in ("loss", "recon_loss", "l1_loss", "sparsity", "aux_loss", "dead_features") if history.get(k)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):  # more axes than panels
        ax.plot(range(1, len(history[key]) + 1), history[key], marker="o", label="train")
        if history.get(f"val_{key}"):
            ax.plot(range(1, len(history[f"val_{key}"]) + 1), history[f"val_{key}"], marker="s", label="val")
            ax.legend()
        ax.set_title("L0 (sparsity)" if key == "sparsity" else key)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Training history")
    return _save(fig, path)


def l0_histogram(l0_hist: np.ndarray, path: Path) -> Path:
    """Tokens per L0 value."""
    l0_hist = np.asarray(l0_hist)
    last = int(np.nonzero(l0_hist)[0].max()) if l0_hist.any() else 1
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stairs(l0_hist[: last + 1], np.arange(last + 2) - 0.5, fill=True)  # one artist, not one bar per value
    mean = float((np.arange(len(l0_hist)) * l0_hist).sum() / max(l0_hist.sum(), 1))
    ax.axvline(mean, color="red", linestyle="--", label=f"mean {mean:.1f}")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("tokens")
    ax.legend()
    ax.set_title("L0 per token")
    return _save(fig, path)


def density_histogram(frequency: np.ndarray, path: Path) -> Path:
    """log10 firing frequency of the features that fired; dead ones counted in the title."""
    frequency = np.asarray(frequency)
    alive = frequency[frequency > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if alive.size:
        ax.hist(np.log10(alive), bins=50)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title(f"Feature density ({int((frequency == 0).sum())} dead of {len(frequency)})")
    return _save(fig, path)


def frequency_vs_mean(frequency: np.ndarray, mean_activation: np.ndarray, path: Path) -> Path:
    frequency, mean_activation = np.asarray(frequency), np.asarray(mean_activation)
    alive = frequency > 0
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(frequency[alive], mean_activation[alive], s=4, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("firing frequency")
    ax.set_ylabel("mean activation when firing")
    ax.set_title("Frequency vs mean activation")
    return _save(fig, path)


def variable_subsample(frequency: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` features with the largest firing variance p(1 - p), sorted."""
    frequency = np.asarray(frequency)
    var = frequency * (1 - frequency)
    order = np.argsort(-var, kind="stable")[: min(n, int((frequency > 0).sum()) or len(frequency))]
    return np.sort(order)


def cluster_order(matrix: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 - matrix (similarity-like input)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(matrix) < 3:
        return np.arange(len(matrix))
    dist = np.clip(1.0 - np.nan_to_num(matrix, nan=0.0, neginf=0.0, posinf=1.0), 0, None)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def clustered_heatmap(matrix: np.ndarray, features: np.ndarray, title: str, path: Path) -> Path:
    order = cluster_order(matrix)
    m = np.nan_to_num(matrix[np.ix_(order, order)], nan=0.0, neginf=0.0)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    lim = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"{title} ({len(features)} most variable features, clustered)")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def similarity_vs_cooccurrence(sim: np.ndarray, cooc: np.ndarray, measure: str, path: Path) -> Path:
    iu = np.triu_indices(len(sim), k=1)
    x, y = sim[iu], cooc[iu]
    ok = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(x[ok], y[ok], s=3, alpha=0.3)
    ax.set_xlabel("decoder cosine similarity")
    ax.set_ylabel(f"co-occurrence ({measure})")
    ax.set_title("Similarity vs co-occurrence (feature pairs)")
    return _save(fig, path)
