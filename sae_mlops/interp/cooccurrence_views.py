"""Co-occurrence views: the clustered heatmap, decoder similarity against co-occurrence, and
clusters of features that fire together.

Co-occurrence ``C_ij`` is the measure the full analysis wrote (``correlation``: the phi coefficient
of the two firing indicators; ``jaccard``; ``pmi``); similarity ``S_ij`` is the cosine of decoder
rows. Both come from :meth:`AnalysisData.pair_values` (dense matrix, else neighbour lists).

High co-occurrence clusters (:func:`high_cooccurrence_clusters`):

1. edges: pairs ``i != j`` with ``C_ij >= threshold``; their connected components;
2. ``method="average"`` (default): inside each component, average-linkage clustering on the
   distance ``d_ij = c_max - C_ij`` cut at ``c_max - threshold``, so every cluster's members have an
   average pairwise co-occurrence of at least ``threshold`` (no cluster spans two components,
   since all pairs between components are below it); ``method="components"`` stops at step 1
   (clusters may then chain through weak links).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from sae_mlops.interp.data import AnalysisData
from sae_mlops.outputs.plots import cluster_order, variable_subsample

log = logging.getLogger(__name__)

_BLOCK = 2048


def heatmap_features(data: AnalysisData, n: int = 100) -> np.ndarray:
    """The ``n`` features with the largest firing variance ``p(1 - p)`` (sorted indices)."""
    return variable_subsample(data.stats["frequency"].to_numpy(), n)


def clustered_matrix(data: AnalysisData, features: np.ndarray, kind: Literal["cooccurrence", "similarity"] = "cooccurrence") -> tuple[np.ndarray, np.ndarray]:
    """(matrix, features) for ``features`` reordered by average-linkage clustering on ``1 - M``
    (the same order the full analysis's heatmap plots use); unknown pairs are NaN."""
    features = np.asarray(features, dtype=np.int64)
    m = data.pair_values(kind, features)
    order = cluster_order(m)
    return m[np.ix_(order, order)], features[order]


def similarity_vs_cooccurrence(data: AnalysisData, features: np.ndarray | None = None, n: int = 200) -> pd.DataFrame:
    """Every pair ``i < j`` of ``features`` (default: the ``n`` most variable) with both values known:
    columns feature_a, feature_b, similarity, cooccurrence."""
    features = heatmap_features(data, n) if features is None else np.asarray(features, dtype=np.int64)
    sim = data.pair_values("similarity", features)
    cooc = data.pair_values("cooccurrence", features)
    a, b = np.triu_indices(len(features), k=1)
    frame = pd.DataFrame({"feature_a": features[a], "feature_b": features[b], "similarity": sim[a, b], "cooccurrence": cooc[a, b]})
    return frame[np.isfinite(frame["similarity"]) & np.isfinite(frame["cooccurrence"])].reset_index(drop=True)


def _edges(data: AnalysisData, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i != j, with C_ij >= threshold, from the dense matrix in row blocks or from the
    neighbour lists."""
    alive = data.stats["firing_count"].to_numpy() > 0
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    if data.cooccurrence is not None:
        m = data.cooccurrence
        for start in range(0, m.shape[0], _BLOCK):
            block = np.asarray(m[start : start + _BLOCK], dtype=np.float64)
            r, c = np.nonzero(np.nan_to_num(block, nan=-np.inf) >= threshold)
            r = r + start
            keep = (r != c) & alive[r] & alive[c]
            rows.append(r[keep])
            cols.append(c[keep])
    elif data.cooccurrence_neighbours is not None:
        t = data.cooccurrence_neighbours
        f, nb, v = (t[c].to_numpy() for c in ("feature", "neighbour", "value"))
        keep = (np.nan_to_num(v, nan=-np.inf) >= threshold) & (f != nb) & (nb >= 0) & alive[f] & alive[np.clip(nb, 0, None)]
        rows.append(f[keep].astype(np.int64))
        cols.append(nb[keep].astype(np.int64))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def _average_linkage(c: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster labels from average linkage on ``c_max - C`` cut at ``c_max - threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    finite = c[np.isfinite(c)]
    floor = min(threshold - 1.0, float(finite.min()) if finite.size else threshold - 1.0)
    c = np.where(np.isfinite(c), c, floor)
    c = (c + c.T) / 2
    c_max = max(float(c.max()), threshold)
    d = c_max - c
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="average")
    return fcluster(z, t=c_max - threshold + 1e-12, criterion="distance")


def high_cooccurrence_clusters(
    data: AnalysisData,
    threshold: float = 0.3,
    method: Literal["average", "components"] = "average",
    min_size: int = 2,
    max_component: int = 4000,
) -> list[np.ndarray]:
    """Clusters of features that fire together (rules in the module docstring), as sorted index
    arrays; largest first, ties by higher mean inside co-occurrence. Components larger than
    ``max_component`` are kept whole (average linkage on them would need a dense block that big)."""
    if method not in ("average", "components"):
        raise ValueError(f"unknown method {method!r}; use average or components")
    r, c = _edges(data, threshold)
    d = data.d_sae
    graph = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(d, d)).tocsr()
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels, minlength=labels.max() + 1 if len(labels) else 0)
    clusters: list[np.ndarray] = []
    for comp in np.flatnonzero(sizes >= max(min_size, 2)):
        members = np.flatnonzero(labels == comp)
        if method == "components" or len(members) <= 2:
            clusters.append(members)
            continue
        if len(members) > max_component:
            log.warning("co-occurrence component of %d features is larger than %d; kept whole", len(members), max_component)
            clusters.append(members)
            continue
        sub = _average_linkage(data.pair_values("cooccurrence", members), threshold)
        for lab in np.unique(sub):
            part = members[sub == lab]
            if len(part) >= max(min_size, 2):
                clusters.append(np.sort(part))
    scored = [(len(m), inside_mean(data, m), m) for m in clusters]
    scored.sort(key=lambda t: (-t[0], -np.nan_to_num(t[1], nan=-np.inf), int(t[2][0])))
    return [m for _, _, m in scored]


def inside_mean(data: AnalysisData, members: np.ndarray, kind: Literal["cooccurrence", "similarity"] = "cooccurrence") -> float:
    """Mean of ``M_ij`` over the known pairs ``i < j`` inside ``members``."""
    if len(members) < 2:
        return float("nan")
    m = data.pair_values(kind, members)
    v = m[np.triu_indices(len(members), k=1)]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def cluster_table(data: AnalysisData, clusters: list[np.ndarray], top_tokens: int = 3) -> pd.DataFrame:
    """One row per cluster: size, features, mean inside co-occurrence and similarity, and the most
    common trigger tokens of its members' top examples."""
    by_feature = {int(s["feature"]): s for s in data.summaries}
    rows = []
    for k, members in enumerate(clusters):
        tokens = pd.Series([e.get("token", "") for f in members for e in by_feature.get(int(f), {}).get("top_examples", [])], dtype=object)
        rows.append(
            {
                "cluster": k,
                "size": len(members),
                "features": [int(f) for f in members],
                "mean_cooccurrence": inside_mean(data, members, "cooccurrence"),
                "mean_similarity": inside_mean(data, members, "similarity"),
                "top_tokens": [repr(t) for t in tokens.value_counts().index[:top_tokens]],
            }
        )
    return pd.DataFrame(rows, columns=["cluster", "size", "features", "mean_cooccurrence", "mean_similarity", "top_tokens"])
