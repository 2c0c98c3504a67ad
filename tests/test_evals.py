"""The evals (sae_mlops.evals) against independent computations on small data: k-sparse probe
accuracy against a hand-fitted scikit-learn model on the same features, absorption on a planted SAE
whose answer is known (and the floor when activations carry no first letters), the dense-feature
sampling of the detection score, and the autointerp summary's interval."""

from __future__ import annotations

import string

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sae_mlops.evals.absorption import AbsorptionSettings, absorption_eval
from sae_mlops.evals.autointerp import autointerp_metrics
from sae_mlops.evals.datasets import LabelledDataset
from sae_mlops.evals.probe import probe_dataset, probe_metrics
from sae_mlops.features.label import detection_set, non_activating_rows
from sae_mlops.metrics import lookup


def _signal_data(n: int, d: int, classes: list[str], seed: int) -> tuple[LabelledDataset, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = [classes[i % len(classes)] for i in range(n)]
    y = np.array([classes.index(c) for c in labels])
    raw = rng.normal(size=(n, 8)) + 0.8 * np.eye(8)[y % 8]
    codes = np.maximum(rng.normal(size=(n, d)) * 0.5, 0)
    codes[np.arange(n), 3 + y] += rng.uniform(0.2, 1.0, n)  # class c lights latent 3 + c (noisily)
    ds = LabelledDataset("toy", [f"t{i}" for i in range(n)], labels, "digest", "test")
    return ds, codes.astype(np.float32), raw.astype(np.float32)


def _hand_fit(x: np.ndarray, y01: np.ndarray, idx: np.ndarray, k: int | None) -> float:
    tr, te, ytr, yte = train_test_split(idx, y01, test_size=0.25, stratify=y01, random_state=7)
    xtr, xte = x[tr], x[te]
    if k is not None:
        diff = [abs(xtr[ytr == 1, j].mean() - xtr[ytr == 0, j].mean()) for j in range(x.shape[1])]
        cols = sorted(range(x.shape[1]), key=lambda j: (-diff[j], j))[:k]
        xtr, xte = xtr[:, cols], xte[:, cols]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def test_binary_probe_accuracy_is_a_hand_fitted_sklearn_model_on_the_same_features() -> None:
    ds, codes, raw = _signal_data(120, 30, ["no", "yes"], seed=1)
    rows = probe_dataset(ds, codes, raw, (1, 2, 5), test_fraction=0.25, seed=7)
    y01 = np.array([1 if c == "yes" else 0 for c in ds.labels])
    idx = np.arange(len(y01))
    for r in rows:
        x = codes if r["representation"] == "sae" else raw
        k = None if r["representation"] == "dense" else r["k"]
        assert r["accuracy"] == pytest.approx(_hand_fit(x, y01, idx, k)), r
        assert r["n_test"] == 30 and r["n_train"] == 90
    sae1 = next(r for r in rows if r["representation"] == "sae" and r["k"] == 1)
    assert sae1["latents"] in ("3", "4") and sae1["accuracy"] > 0.65  # a planted class latent is found first (chance 0.5)
    m = probe_metrics(__import__("pandas").DataFrame(rows))
    assert m["probe/toy/sae_acc_k1"] == pytest.approx(sae1["accuracy"])
    acc = m["probe/sae_acc_k1"]
    half = 1.959964 * np.sqrt(acc * (1 - acc) / 30)
    assert m["probe/sae_acc_k1_ci_low"] == pytest.approx(max(0, acc - half)) and m["probe/sae_acc_k1_ci_high"] == pytest.approx(min(1, acc + half))


def test_multiclass_probe_is_one_balanced_task_per_class_averaged() -> None:
    ds, codes, raw = _signal_data(150, 20, ["a", "b", "c"], seed=2)
    import pandas as pd

    table = pd.DataFrame(probe_dataset(ds, codes, raw, (1, 50), test_fraction=0.25, seed=0))
    assert sorted(set(table["task"])) == ["a", "b", "c"]
    assert set(table["n_test"] + table["n_train"]) == {100}  # 50 of the class + 50 sampled from the rest
    assert not (table["k"] == 50).any() or (table[(table["k"] == 50)]["representation"] != "raw").all()  # k above d is skipped
    m = probe_metrics(table)
    per_task = table[(table["representation"] == "sae") & (table["k"] == 1)]["accuracy"]
    assert m["probe/toy/sae_acc_k1"] == pytest.approx(per_task.mean())
    assert m["probe/tasks"] == 3 and m["probe/datasets"] == 1
    assert "probe/raw_acc_k50" not in m and "probe/toy/sae_acc_k50" not in m  # d_sae = 20 < 50
    for name in m:
        assert lookup(name) is not None or name.endswith(("_ci_low", "_ci_high")), name


def _planted(seed: int = 0):
    """Five letters, 40 words each. x = 2 e_letter + noise; 8 'a' words carry their own direction t_j
    and an absorbing latent fires on them while the 'a' latent is switched off; the 'b' words fall in
    two groups, each with its own 'b' latent (one split). Returns (acts, words, encode, W_dec, absorbed words)."""
    rng = np.random.default_rng(seed)
    letters = "abcde"
    d = 40
    words, rows = [], []
    absorbed = set()
    for li, letter in enumerate(letters):
        for i in range(40):
            w = letter + "".join(rng.choice(list(string.ascii_lowercase), 4)) + str(i)
            x = np.zeros(d)
            x[li] = 2.0
            x[15:] = rng.normal(scale=0.3, size=d - 15)
            if letter == "a" and i < 8:
                x[5 + i] = 1.5  # t_i
                absorbed.add(w)
            if letter == "b":
                x[13 + (i % 2)] = 1.0  # group direction g1 / g2
            words.append(w.replace(str(i), "x" * (i + 1)))
            rows.append(x)
    absorbed = {words[i] for i in range(8)}  # the first 8 'a' words, renamed as above
    acts = np.array(rows, dtype=np.float32)

    def vec(**entries: float) -> np.ndarray:
        v = np.zeros(d)
        for key, value in entries.items():
            lo, _, hi = key[1:].partition("_")
            v[int(lo): int(hi or lo) + 1] = value
        return v

    enc, dec, bias = [], [], []
    for li, letter in enumerate(letters):
        if letter == "b":
            for g in (13, 14):
                enc.append(vec(**{f"i{li}": 1.0, f"i{g}": 2.0}))
                dec.append(vec(**{f"i{li}": 2.0, f"i{g}": 1.0}))
                bias.append(-3.0)
            continue
        w = vec(**{f"i{li}": 1.0})
        if letter == "a":
            w[5:13] = -10.0  # switched off where an absorbing latent takes over
        enc.append(w)
        dec.append(vec(**{f"i{li}": 2.0}))
        bias.append(-1.0)
    for j in range(8):
        enc.append(vec(i0=1.0, **{f"i{5 + j}": 1.0}))
        dec.append(vec(i0=2.0, **{f"i{5 + j}": 1.5}))
        bias.append(-2.5)
    W_enc, W_dec, b = np.array(enc).T, np.array(dec), np.array(bias)

    def encode(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ W_enc + b, 0.0)

    return acts, words, encode, W_dec, absorbed


def test_absorption_finds_the_planted_absorption_and_split() -> None:
    acts, words, encode, w_dec, absorbed = _planted()
    res = absorption_eval(acts, words, encode, w_dec, AbsorptionSettings(min_letters=3, test_fraction=0.3, seed=0))
    assert res.encoded, res.message
    t = res.table.set_index("letter")
    assert set(t.index) == set("abcde") and t["evaluated"].all()
    judged = {r["word"]: r for r in res.details["word_results"]}
    a_words = [w for w, r in judged.items() if r["letter"] == "a"]
    expected_full = {w for w in a_words if w in absorbed}
    assert expected_full  # the split put some absorbed words in the test set
    assert {w for w, r in judged.items() if r["full_absorption"]} == expected_full
    assert t.loc["a", "full_absorption_rate"] == pytest.approx(len(expected_full) / len(a_words))
    assert t.loc["a", "absorption_fraction"] == pytest.approx(len(expected_full) / len(a_words))
    assert t.loc["a", "split_latents"] == 0 and t.loc["b", "split_latents"] == 1
    for letter in "bcde":
        assert t.loc[letter, "full_absorption_rate"] == 0.0 and t.loc[letter, "absorption_fraction"] == 0.0
    m = res.metrics
    assert m["absorption/full_absorption_rate"] == pytest.approx(t["full_absorption_rate"].mean())
    assert m["absorption/split_latents"] == pytest.approx(0.2)
    assert m["absorption/full_absorption_rate_ci_low"] <= m["absorption/full_absorption_rate"] <= m["absorption/full_absorption_rate_ci_high"]
    assert m["absorption/a/full_absorption_rate"] == t.loc["a", "full_absorption_rate"]


def test_absorption_says_so_when_activations_carry_no_first_letter() -> None:
    acts, words, encode, w_dec, _ = _planted()
    noise = np.random.default_rng(3).normal(size=acts.shape).astype(np.float32)
    res = absorption_eval(noise, words, encode, w_dec, AbsorptionSettings())
    assert not res.encoded and "do not encode first letters" in res.message
    assert not any(k.startswith("absorption/full") or k.startswith("absorption/absorption_fraction") or "split" in k for k in res.metrics)
    assert res.metrics["absorption/letters_evaluated"] < 3 and res.metrics["absorption/probe_accuracy"] < 0.5


class _DB:
    """The parts of the activation database `detection_set` reads: one document of n tokens."""

    def __init__(self, n: int, rows: dict[int, np.ndarray], values: dict[int, np.ndarray]):
        self.doc = np.zeros(n, dtype=np.int64)
        self.rows, self.values = rows, values

    def window(self, feature: int, centre: int, width: int) -> list[tuple[str, float, bool]]:
        return [(f" t{r}", 0.0, r == centre) for r in range(max(0, centre - width), min(len(self.doc), centre + width + 1))]


def _window_max(dense: np.ndarray, r: int, width: int) -> float:
    return float(dense[max(0, r - width): r + width + 1].max())


def test_dense_feature_is_not_scored_on_activating_snippets_alone() -> None:
    import random

    rng = np.random.default_rng(0)
    n, width = 3000, 12
    dense_rows = np.sort(rng.choice(n, size=int(0.3 * n), replace=False))
    sparse_rows = np.sort(rng.choice(n, size=40, replace=False))
    db = _DB(n, {0: dense_rows, 1: sparse_rows}, {0: rng.uniform(0.1, 5.0, dense_rows.size), 1: rng.uniform(0.1, 5.0, 40)})
    # the dense feature fires in every window of 25 tokens: too few non-activating snippets, not scored
    snippets, truth, reason = detection_set(db, 0, set(), 5, 5, width, random.Random(0))
    assert snippets == [] and reason and "fewer than 5 non-activating" in reason
    # with a stated quantile, snippets come from windows whose largest activation is at most that quantile
    tau = float(np.quantile(db.values[0], 0.9))
    act0 = np.zeros(n)
    act0[dense_rows] = db.values[0]
    rows = non_activating_rows(db, 0, width, 0.9)
    brute = [r for r in range(n) if _window_max(act0, r, width) <= tau]
    assert rows.tolist() == brute and len(brute) >= 5
    snippets, truth, reason = detection_set(db, 0, set(), 5, 5, width, random.Random(0), quantile=0.9)
    assert reason is None and sorted(truth) == [0] * 5 + [1] * 5
    # a sparse feature: exactly the protocol's numbers, non-activating windows hold no firing at all
    act1 = np.zeros(n)
    act1[sparse_rows] = db.values[1]
    zero_rows = non_activating_rows(db, 1, width)
    assert zero_rows.tolist() == [r for r in range(n) if _window_max(act1, r, width) == 0]
    snippets, truth, reason = detection_set(db, 1, set(sparse_rows[:38].tolist()), 5, 5, width, random.Random(0))
    assert reason and "2 held-out activating" in reason  # only 2 held out: not scored either
    snippets, truth, reason = detection_set(db, 1, set(), 5, 5, width, random.Random(0))
    assert reason is None and len(snippets) == 10 and sum(truth) == 5


def test_autointerp_summary_counts_and_interval() -> None:
    from scipy.stats import bootstrap

    scores = [0.5, 0.7, 0.9, 1.0, 0.6, 0.8]
    recs = {i: {"feature": i, "detection_balanced_accuracy": s} for i, s in enumerate(scores)}
    recs[10] = {"feature": 10, "detection_skipped": "0 windows where the feature is zero, fewer than 5 non-activating snippets"}
    m = autointerp_metrics(recs)
    assert m["autointerp/features_scored"] == 6 and m["autointerp/features_not_scored"] == 1 and m["autointerp/features_labelled"] == 7
    assert m["autointerp/detection_score"] == pytest.approx(np.mean(scores))
    ci = bootstrap((np.array(scores),), np.mean, n_resamples=2000, method="percentile", random_state=np.random.default_rng(0)).confidence_interval
    assert (m["autointerp/detection_score_ci_low"], m["autointerp/detection_score_ci_high"]) == pytest.approx((ci.low, ci.high))
    assert m["autointerp/detection_score_ci_low"] < np.mean(scores) < m["autointerp/detection_score_ci_high"]
    assert "autointerp/detection_score" not in autointerp_metrics({1: recs[10]})
    for name in m:
        assert lookup(name) is not None or name.endswith(("_ci_low", "_ci_high")), name


def test_eval_metrics_are_registered_apart_and_documented() -> None:
    import re
    from pathlib import Path

    from sae_mlops.metrics import BY_NAME, EVAL_METRICS, ci_names

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "evals.md").read_text()
    for m in EVAL_METRICS:
        assert m.name not in BY_NAME and re.fullmatch(r"[a-z]+/[a-z0-9_]+", m.name), m.name
        assert lookup(m.name) is m and m.higher_is_better in (True, False, None) and m.label and m.unit
        stem = re.sub(r"_k\d+$", "_k", m.name)
        assert f"`{m.name}`" in guide or f"`{stem}" in guide, f"{m.name} is not in docs/guides/evals.md"
    assert lookup("probe/my_dataset/sae_acc_k5").name == "probe/sae_acc_k5"
    assert lookup("absorption/s/full_absorption_rate").higher_is_better is False
    assert lookup("autointerp").name == "autointerp/detection_score"
    assert ci_names("probe/sae_acc_k1") == ("probe/sae_acc_k1_ci_low", "probe/sae_acc_k1_ci_high")
