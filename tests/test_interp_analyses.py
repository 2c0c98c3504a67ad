"""sae_mlops.interp on hand-made analyses: loading, the token-density heuristic, contexts, clusters,
the cluster deep dive, decoder PCA and position-0 features (each against a count or numpy by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sae_mlops.errors import InputError
from sae_mlops.interp import clusters as K
from sae_mlops.interp import cooccurrence_views as C
from sae_mlops.interp import density as D
from sae_mlops.interp import features as F
from sae_mlops.interp import figures as P
from sae_mlops.interp import position as Pos
from sae_mlops.interp.data import AnalysisData, analysis_overview, find_newest, load_analysis, open_analysis

TS_OLD, TS = "20240101_000000", "20240102_000000"


def ex(token: str, pos: int = 5, act: float = 1.0, tid: int | None = None) -> dict:
    return {
        "token": token,
        "token_id": tid if tid is not None else sum(map(ord, token)),
        "activation": act,
        "context": f"a b [[{token}]] c",
        "position": pos,
        "text_idx": 0,
        "global_idx": 0,
    }


def summary(feature: int, examples: list[dict], count: int = 10) -> dict:
    return {"feature": feature, "activation_frequency": count, "firing_fraction": count / 1000, "mean_activation": 1.0, "max_activation": 2.0, "top_examples": examples}


# Eight features: 0-2 and 3-5 co-fire in blocks; 6 alone; 7 dead.
COOC = np.array(
    [
        [1.0, 0.8, 0.7, 0.0, 0.0, 0.0, 0.1, 0.0],
        [0.8, 1.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.7, 0.6, 1.0, 0.35, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.35, 1.0, 0.5, 0.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.5, 1.0, 0.9, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.5, 0.9, 1.0, 0.0, 0.0],
        [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ],
    dtype=np.float32,
)


def hand_summaries() -> list[dict]:
    return [
        summary(0, [ex("the")] * 10),  # top-1 1.0 -> interpretable
        summary(1, [ex("a")] * 9 + [ex("b")]),  # top-1 0.9 -> interpretable at t1=0.9
        summary(2, [ex("a")] * 5 + [ex("b")] * 3 + [ex("c")] * 2),  # top-3 1.0 -> medium
        summary(3, [ex(t) for t in "abcdefghij"]),  # polysemantic
        summary(4, []),  # no_examples
        summary(5, [ex("x", pos=0)] * 3 + [ex("y", pos=7)]),  # 3/4 at position 0
        summary(6, [ex("z", pos=0), ex("z", pos=1)]),  # 1/2 at position 0
    ]


def write_analysis(root: Path, dense: bool = True, ts: str = TS) -> Path:
    (root / "results").mkdir(parents=True, exist_ok=True)
    (root / "matrices").mkdir(parents=True, exist_ok=True)
    lines = "\n".join(json.dumps(s) for s in hand_summaries())
    (root / "results" / f"feature_summaries_{ts}.jsonl").write_text(lines + "\n")
    counts = [10, 10, 10, 10, 10, 4, 2, 0]
    stats = pd.DataFrame(
        {"feature": range(8), "firing_count": counts, "frequency": [c / 1000 for c in counts], "mean_activation": 1.0, "max_activation": 2.0}
    )
    stats.to_parquet(root / "results" / f"feature_stats_{ts}.parquet")
    (root / "results" / f"analysis_results_{ts}.json").write_text(json.dumps({"params": {"d_sae": 8, "full_cooccurrence_measure": "correlation"}, "metrics": {"sparsity/l0_mean": 3.0}}))
    if dense:
        np.save(root / "matrices" / f"feature_cooccurrence_{ts}.npy", COOC)
    rows = [(i, r, j, COOC[i, j]) for i in range(8) for r, j in enumerate(k for k in np.argsort(-COOC[i]) if k != i) if r < 2]
    nb = pd.DataFrame(rows, columns=["feature", "rank", "neighbour", "value"]).astype({"feature": "int32", "rank": "int16", "neighbour": "int32", "value": "float32"})
    nb.to_parquet(root / "matrices" / f"cooccurrence_neighbours_{ts}.parquet")
    return root


@pytest.fixture
def hand(tmp_path) -> AnalysisData:
    return load_analysis(write_analysis(tmp_path / "a"))


# --- loading ------------------------------------------------------------------------------------


def test_find_newest_picks_latest_timestamp_and_ignores_partials(tmp_path):
    for name in (f"x_{TS_OLD}.jsonl", f"x_{TS}.jsonl", ".x_20250101_000000.jsonl.abc.part", "x_notatime.jsonl"):
        (tmp_path / name).write_text("")
    assert find_newest(tmp_path, "x_", ".jsonl").name == f"x_{TS}.jsonl"
    assert find_newest(tmp_path / "missing", "x_", ".jsonl") is None


def test_load_analysis_reads_newest_files(tmp_path):
    root = write_analysis(tmp_path / "a", ts=TS_OLD)
    write_analysis(root, ts=TS)
    data = load_analysis(root)
    assert data.timestamp == TS and data.d_sae == 8
    assert [s["feature"] for s in data.summaries] == list(range(7))
    assert data.cooccurrence is not None and data.similarity is None
    assert data.summary(7)["top_examples"] == []  # dead: an empty summary, not an error
    with pytest.raises(InputError, match="out of range"):
        data.summary(8)
    assert list(data.alive()) == list(range(7))
    overview = analysis_overview(data)
    assert "sparsity/l0_mean" in set(overview["name"])


def test_missing_summaries_name_the_full_analysis(tmp_path):
    (tmp_path / "q" / "results").mkdir(parents=True)
    (tmp_path / "q" / "results" / f"analysis_results_{TS}.json").write_text("{}")
    with pytest.raises(InputError, match=r"quick analysis.*sae-mlops full"):
        load_analysis(tmp_path / "q")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"not a full analysis directory.*sae-mlops full"):
        load_analysis(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        load_analysis(tmp_path / "nowhere")
    with pytest.raises(InputError, match="run id"):
        open_analysis()


def test_pair_values_from_neighbour_lists(tmp_path):
    data = load_analysis(write_analysis(tmp_path / "n", dense=False))
    assert data.cooccurrence is None
    m = data.pair_values("cooccurrence", np.array([0, 1, 4]))
    assert m[0, 1] == pytest.approx(0.8) and m[1, 0] == pytest.approx(0.8)  # listed either way
    assert np.isnan(m[0, 2])  # 0 and 4 are not each other's neighbours
    assert np.isnan(data.pair_values("similarity", np.array([0, 1]))).all()  # no similarity at all


# --- feature tables and contexts --------------------------------------------------------------


def test_feature_table_top_features_and_token_counts(hand):
    table = F.feature_table(hand)
    assert len(table) == 7 and table.loc[table.feature == 4, "n_examples"].item() == 0
    assert table.loc[table.feature == 1, "top_token"].item() == "a"
    top = F.top_features(table, "activation_frequency", 3)
    assert list(top["feature"]) == [0, 1, 2]  # ties broken by index
    assert set(F.describe_features(table).index) >= {"mean", "std", "max"}
    counts = F.token_counts(hand, 2)
    assert list(counts["token"]) == ["a", "b", "c"] and list(counts["count"]) == [5, 3, 2]
    assert counts["share"].sum() == pytest.approx(1.0)
    assert F.token_counts(hand, 4).empty


def test_highlighting():
    ctx = "x <y> [[tok\n]] & z"
    assert F.split_context(ctx) == ("x <y> ", "tok\n", " & z")
    html = F.highlight_context(ctx, "html")
    assert "<mark" in html and "&lt;y&gt;" in html and "&amp;" in html and "tok\u21b5</mark>" in html
    assert F.highlight_context("a [[*b*]] c", "markdown") == "a **\\*b\\*** c"
    assert F.highlight_context(ctx, "text") == "x <y> [[tok\u21b5]] & z"
    assert F.split_context("no mark") == ("no mark", "", "")


def test_highlighted_contexts_and_positions(hand):
    html = F.highlighted_contexts(hand, 5, n=2)
    assert html.count("<tr>") == 3 and "<mark" in html  # header + 2 rows
    assert "no stored examples" in F.highlighted_contexts(hand, 4)
    md = F.highlighted_contexts(hand, 5, fmt="markdown")
    assert md.count("\n") == 3 and "**x**" in md
    counts, edges = F.position_histogram(hand, 5, bins=[0, 1, 10])
    assert list(counts) == [3, 1] and list(edges) == [0, 1, 10]
    assert F.position_histogram(hand, 4)[0].size == 0


# --- token density --------------------------------------------------------------------------


def test_density_labels_on_hand_made_examples(hand):
    d = D.token_density(hand.summaries).set_index("feature")
    assert d.loc[0, "label"] == "interpretable" and d.loc[0, "top1_share"] == 1.0
    assert d.loc[1, "label"] == "interpretable" and d.loc[1, "top1_share"] == pytest.approx(0.9)
    assert d.loc[2, "label"] == "medium" and d.loc[2, "top1_share"] == 0.5 and d.loc[2, "top3_share"] == 1.0
    assert d.loc[3, "label"] == "polysemantic" and d.loc[3, "top3_share"] == pytest.approx(0.3)
    assert d.loc[4, "label"] == "no_examples" and d.loc[4, "n_examples"] == 0
    assert d.loc[2, "top1_token"] == "a" and d.loc[3, "n_distinct_tokens"] == 10
    counts = D.label_counts(d)
    assert list(counts.index) == list(D.LABELS) and counts.sum() == 7


def test_density_thresholds_are_parameters(hand):
    strict = D.token_density(hand.summaries, t1=0.95, t3=0.95).set_index("feature")["label"]
    assert strict[1] == "medium"  # top-1 0.9 < 0.95, top-3 1.0
    loose = D.token_density(hand.summaries, t1=0.5, t3=0.3).set_index("feature")["label"]
    assert loose[2] == "interpretable" and loose[3] == "medium"
    assert D.density_label(0.2, 0.2, 5, t1=0.9, t3=0.2) == "medium"
    with pytest.raises(ValueError):
        D.token_density(hand.summaries, t1=1.5)


def test_density_counts_tokens_by_id():
    # Same string, two ids (e.g. different tokenisations): not one token.
    s = [summary(0, [ex("a", tid=1)] * 5 + [ex("a", tid=2)] * 5)]
    row = D.token_density(s).iloc[0]
    assert row["top1_share"] == 0.5 and row["n_distinct_tokens"] == 2


def test_pick_features_covers_labels(hand):
    table = F.feature_table(hand)
    picked = F.pick_features(table, D.token_density(hand.summaries), n=3)
    labels = D.token_density(hand.summaries).set_index("feature")["label"]
    assert len(picked) == 3 and {labels[f] for f in picked} == {"interpretable", "medium", "polysemantic"}
    assert 4 not in F.pick_features(table, None, n=7)  # never a feature without examples


# --- clusters --------------------------------------------------------------------------------


def test_average_linkage_clusters_keep_the_mean_above_threshold(hand):
    found = C.high_cooccurrence_clusters(hand, threshold=0.3)
    # 2-3 at 0.35 links the blocks into one component, but the blocks' mean between them is low.
    assert [list(c) for c in found] == [[0, 1, 2], [3, 4, 5]] or [list(c) for c in found] == [[3, 4, 5], [0, 1, 2]]
    for c in found:
        assert C.inside_mean(hand, c) >= 0.3
    comps = C.high_cooccurrence_clusters(hand, threshold=0.3, method="components")
    assert [list(c) for c in comps] == [[0, 1, 2, 3, 4, 5]]
    assert C.high_cooccurrence_clusters(hand, threshold=0.95) == []
    high = C.high_cooccurrence_clusters(hand, threshold=0.85)
    assert [list(c) for c in high] == [[4, 5]]
    # 6 co-fires with 0 at 0.1: never in a cluster above that
    assert all(6 not in c for c in C.high_cooccurrence_clusters(hand, threshold=0.05, method="average"))  # avg with block 0-2 < 0.05
    with pytest.raises(ValueError):
        C.high_cooccurrence_clusters(hand, method="nope")


def test_clusters_from_neighbour_lists(tmp_path):
    data = load_analysis(write_analysis(tmp_path / "n", dense=False))
    found = C.high_cooccurrence_clusters(data, threshold=0.3)
    assert sorted(map(list, found)) == [[0, 1, 2], [3, 4, 5]]
    table = C.cluster_table(data, found)
    assert list(table["size"]) == [3, 3] and table["mean_cooccurrence"].notna().all()


def test_clustered_matrix_and_pairs(hand):
    m, order = C.clustered_matrix(hand, np.arange(7))
    assert sorted(order) == list(range(7))
    assert np.allclose(m, COOC[np.ix_(order, order)])
    hand.decoder = np.eye(8, 4, dtype=np.float32) + 0.1
    pairs = C.similarity_vs_cooccurrence(hand, np.arange(4))
    assert len(pairs) == 6 and set(pairs.columns) == {"feature_a", "feature_b", "similarity", "cooccurrence"}
    u = hand.decoder / np.linalg.norm(hand.decoder, axis=1, keepdims=True)
    row = pairs[(pairs.feature_a == 0) & (pairs.feature_b == 1)].iloc[0]
    assert row["similarity"] == pytest.approx(float(u[0] @ u[1])) and row["cooccurrence"] == pytest.approx(0.8)


# --- cluster deep dive ------------------------------------------------------------------------


def test_inside_outside_distributions(hand):
    pairs = K.inside_outside(hand, np.array([0, 1, 2]))
    inside = pairs[pairs["where"] == "inside"]
    outside = pairs[pairs["where"] == "outside"]
    assert sorted(inside["value"].round(3)) == [0.6, 0.7, 0.8]
    assert len(outside) == 3 * 4  # members x live non-members (3, 4, 5, 6; 7 is dead)
    assert outside["value"].max() == pytest.approx(0.35)
    summary_ = K.distribution_summary(pairs)
    assert summary_.loc["inside", "mean"] == pytest.approx(0.7)
    assert summary_.loc["inside", "count"] == 3


def test_frequency_vs_cooccurrence(hand):
    frame = K.frequency_vs_cooccurrence(hand, np.array([3, 4, 5])).set_index("feature")
    assert frame.loc[3, "mean_cooccurrence_inside"] == pytest.approx(0.5)
    assert frame.loc[4, "mean_cooccurrence_inside"] == pytest.approx(0.7)
    assert frame.loc[3, "max_cooccurrence_outside"] == pytest.approx(0.35)
    assert frame.loc[3, "frequency"] == pytest.approx(0.01)


def test_decoder_norms_and_pca_shapes():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(20, 6)).astype(np.float32)
    norms = K.decoder_norms(w, np.array([1, 2]))
    assert norms.shape == (20, 3) and norms["in_cluster"].sum() == 2
    assert norms["norm"].to_numpy() == pytest.approx(np.linalg.norm(w, axis=1), rel=1e-5)
    coords, ratio = K.decoder_pca(w, np.arange(20), k=3)
    assert coords.shape == (20, 3) and ratio.shape == (3,)
    # against the covariance eigen-decomposition
    x = w.astype(np.float64) - w.mean(0)
    evals = np.sort(np.linalg.eigvalsh(x.T @ x))[::-1]
    assert ratio == pytest.approx(evals[:3] / evals.sum(), rel=1e-6)
    assert np.var(coords, axis=0) * 20 == pytest.approx(evals[:3], rel=1e-6)
    assert np.all(np.diff(ratio) <= 0)
    coords, ratio = K.decoder_pca(w, np.arange(2), k=5)  # k capped by the rows
    assert coords.shape == (2, 2)
    frame, _ = K.pca_frame(w, np.arange(10), np.array([3]))
    assert list(frame.columns) == ["feature", "pc1", "pc2", "in_cluster"] and frame["in_cluster"].sum() == 1


def test_interaction_network(hand):
    edges = K.interaction_network(hand, np.array([3, 4, 5]), min_cooccurrence=0.6)
    assert list(zip(edges.source, edges.target, strict=True)) == [(4, 5)]
    all_edges = K.interaction_network(hand, np.array([3, 4, 5]))
    assert len(all_edges) == 3 and all_edges["cooccurrence"].is_monotonic_decreasing
    layout = K.network_layout(np.array([3, 4, 5]), all_edges)
    assert set(layout) == {3, 4, 5} and all(len(p) == 2 for p in layout.values())


# --- position-0 ---------------------------------------------------------------------------------


def test_position_zero_features(hand):
    hits = Pos.position_zero_features(hand.summaries)
    assert list(hits["feature"]) == [5, 6]  # 3/4 then 1/2
    assert hits.iloc[0]["share"] == pytest.approx(0.75) and hits.iloc[0]["n_at_start"] == 3
    assert list(Pos.position_zero_features(hand.summaries, min_share=0.6)["feature"]) == [5]
    assert list(Pos.position_zero_features(hand.summaries, min_share=0.6, min_examples=5)["feature"]) == []
    wide = Pos.position_zero_features(hand.summaries, max_position=1, min_share=1.0)
    assert list(wide["feature"]) == [6]
    shares = Pos.position_shares(hand.summaries).set_index("feature")
    assert shares.loc[4, "share"] == 0.0 and shares.loc[0, "share"] == 0.0
    with pytest.raises(ValueError):
        Pos.position_zero_features(hand.summaries, min_share=2)


# --- plots ---------------------------------------------------------------------------------------


def test_every_plot_returns_a_figure(hand):
    from matplotlib.figure import Figure

    hand.decoder = np.random.default_rng(0).normal(size=(8, 4))
    table = F.feature_table(hand)
    dens = D.token_density(hand.summaries)
    members = np.array([0, 1, 2])
    m, order = C.clustered_matrix(hand, np.arange(7))
    pca, ratio = K.pca_frame(hand.decoder, hand.alive(), members)
    edges = K.interaction_network(hand, members)
    figs = [
        P.frequency_vs_mean(table),
        P.top_features(F.top_features(table), "mean_activation"),
        P.token_counts(F.token_counts(hand, 2), 2),
        P.position_histogram(*F.position_histogram(hand, 5), 5),
        P.token_density(dens),
        P.clustered_heatmap(m, order, "co-occurrence"),
        P.similarity_vs_cooccurrence(C.similarity_vs_cooccurrence(hand, np.arange(7))),
        P.cluster_sizes(C.high_cooccurrence_clusters(hand)),
        P.inside_outside(K.inside_outside(hand, members), K.inside_outside(hand, members, "similarity")),
        P.frequency_vs_cooccurrence(K.frequency_vs_cooccurrence(hand, members)),
        P.decoder_norms(K.decoder_norms(hand.decoder, members)),
        P.decoder_pca(pca, ratio),
        P.interaction_network(edges, K.network_layout(members, edges)),
        P.position_zero(Pos.position_shares(hand.summaries), Pos.position_zero_features(hand.summaries)),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        assert P.fig_to_png(fig, dpi=30).startswith(b"\x89PNG")
        assert P.figure_title(fig) != "figure"
