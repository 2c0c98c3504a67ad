"""Cluster deep dive: how a cluster of co-firing features compares with the rest of the SAE.

For a cluster ``K`` (feature indices) and the set ``A`` of features that fired:

- inside pairs: ``{(i, j) : i < j, i, j in K}``; outside pairs: ``{(i, j) : i in K, j in A \\ K}``;
  :func:`inside_outside` returns ``M_ij`` over both for co-occurrence or decoder similarity
  (with only neighbour lists, outside pairs are those listed, biased towards high values);
- :func:`frequency_vs_cooccurrence`: per member ``i``, its firing fraction ``p_i``, its mean
  co-occurrence with the other members ``mean_{j in K, j != i} C_ij`` and its strongest
  co-occurrence outside ``max_{j in A \\ K} C_ij``;
- :func:`decoder_norms`: ``||W_dec[i]||_2`` for every feature, flagged in/out of the cluster;
- :func:`decoder_pca`: principal components of decoder rows: ``X = W_dec[F] - mean(W_dec[F])``,
  ``X = U S V^T`` (thin SVD), coordinates ``U[:, :k] S[:k]``, explained variance ratio
  ``S_k^2 / sum_l S_l^2``;
- :func:`interaction_network`: the member pairs with ``C_ij >= min_cooccurrence`` as weighted
  edges, and :func:`network_layout` positions for drawing them (networkx spring layout when
  networkx is installed, else a circle).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import pandas as pd

from sae_mlops.interp.data import AnalysisData


def inside_outside(data: AnalysisData, members: np.ndarray, kind: Literal["cooccurrence", "similarity"] = "cooccurrence") -> pd.DataFrame:
    """Pair values inside the cluster and between it and the other live features: columns
    feature_a, feature_b, value, where ("inside" / "outside"); unknown pairs dropped."""
    members = np.unique(np.asarray(members, dtype=np.int64))
    others = np.setdiff1d(data.alive(), members)
    frames = []
    if len(members) >= 2:
        m = data.pair_values(kind, members)
        a, b = np.triu_indices(len(members), k=1)
        frames.append(pd.DataFrame({"feature_a": members[a], "feature_b": members[b], "value": m[a, b], "where": "inside"}))
    if len(others):
        m = data.pair_values(kind, members, others)
        a, b = np.indices(m.shape).reshape(2, -1)
        frames.append(pd.DataFrame({"feature_a": members[a], "feature_b": others[b], "value": m.ravel(), "where": "outside"}))
    if not frames:
        return pd.DataFrame(columns=["feature_a", "feature_b", "value", "where"])
    out = pd.concat(frames, ignore_index=True)
    return out[np.isfinite(out["value"].to_numpy(dtype=np.float64))].reset_index(drop=True)


def distribution_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """count, mean, std, min, quartiles, max of ``value`` for inside and outside pairs."""
    return pairs.groupby("where")["value"].describe()


def frequency_vs_cooccurrence(data: AnalysisData, members: np.ndarray) -> pd.DataFrame:
    """Per member: frequency (firing fraction), mean_cooccurrence_inside, max_cooccurrence_outside."""
    members = np.unique(np.asarray(members, dtype=np.int64))
    inside = data.pair_values("cooccurrence", members)
    np.fill_diagonal(inside, np.nan)
    others = np.setdiff1d(data.alive(), members)
    outside = data.pair_values("cooccurrence", members, others) if len(others) else np.full((len(members), 1), np.nan)
    with warnings.catch_warnings():  # all-NaN rows (no known pair) give NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_in = np.nanmean(inside, axis=1) if len(members) > 1 else np.full(len(members), np.nan)
        max_out = np.nanmax(outside, axis=1)
    return pd.DataFrame(
        {
            "feature": members,
            "frequency": data.stats["frequency"].to_numpy()[members],
            "mean_cooccurrence_inside": mean_in,
            "max_cooccurrence_outside": max_out,
        }
    )


def decoder_norms(w_dec: np.ndarray, members: np.ndarray) -> pd.DataFrame:
    """``||W_dec[i]||_2`` for every feature with an ``in_cluster`` flag."""
    w = np.asarray(w_dec, dtype=np.float64)
    flag = np.zeros(len(w), dtype=bool)
    flag[np.asarray(members, dtype=np.int64)] = True
    return pd.DataFrame({"feature": np.arange(len(w)), "norm": np.linalg.norm(w, axis=1), "in_cluster": flag})


def decoder_pca(w_dec: np.ndarray, features: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [len(features), k], explained variance ratio [k]) of the centred decoder rows of
    ``features`` (thin SVD; ``k`` is capped at min(len(features), d_in))."""
    x = np.asarray(w_dec, dtype=np.float64)[np.asarray(features, dtype=np.int64)]
    x = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(k, len(s))
    total = float((s**2).sum())
    ratio = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    return u[:, :k] * s[:k], ratio


def pca_frame(w_dec: np.ndarray, features: np.ndarray, members: np.ndarray, k: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`decoder_pca` as a table (feature, pc1..pck, in_cluster) plus the explained ratios."""
    features = np.asarray(features, dtype=np.int64)
    coords, ratio = decoder_pca(w_dec, features, k)
    frame = pd.DataFrame(coords, columns=[f"pc{i + 1}" for i in range(coords.shape[1])])
    frame.insert(0, "feature", features)
    frame["in_cluster"] = np.isin(features, members)
    return frame, ratio


def interaction_network(data: AnalysisData, members: np.ndarray, min_cooccurrence: float = 0.0) -> pd.DataFrame:
    """Edges between members with known ``C_ij >= min_cooccurrence``: source, target,
    cooccurrence, similarity (strongest first)."""
    members = np.unique(np.asarray(members, dtype=np.int64))
    cooc = data.pair_values("cooccurrence", members)
    sim = data.pair_values("similarity", members)
    a, b = np.triu_indices(len(members), k=1)
    frame = pd.DataFrame({"source": members[a], "target": members[b], "cooccurrence": cooc[a, b], "similarity": sim[a, b]})
    keep = np.isfinite(frame["cooccurrence"]) & (frame["cooccurrence"] >= min_cooccurrence)
    return frame[keep].sort_values("cooccurrence", ascending=False, kind="stable").reset_index(drop=True)


def network_layout(members: np.ndarray, edges: pd.DataFrame, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Node positions: networkx's spring layout (edge weight = co-occurrence) when networkx is
    installed, else evenly on a circle."""
    nodes = [int(f) for f in np.unique(np.asarray(members, dtype=np.int64))]
    try:
        import networkx as nx
    except ImportError:
        nx = None
    if nx is not None and nodes:
        g = nx.Graph()
        g.add_nodes_from(nodes)
        for e in edges.itertuples():
            g.add_edge(int(e.source), int(e.target), weight=max(float(e.cooccurrence), 1e-6))
        pos = nx.spring_layout(g, weight="weight", seed=seed)
        return {int(n): (float(p[0]), float(p[1])) for n, p in pos.items()}
    angles = np.linspace(0, 2 * np.pi, len(nodes), endpoint=False)
    return {n: (float(np.cos(t)), float(np.sin(t))) for n, t in zip(nodes, angles, strict=True)}
