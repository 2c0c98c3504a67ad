"""k-sparse probing (Gurnee et al. 2023; SAEBench's sparse probing; Kantamneni et al. 2025, `sae-probes`).

Per dataset, the texts are pooled (``mean`` over analysed tokens, or the ``last`` one) into

- SAE codes z [n, d_sae]: the mean over the text's tokens of the SAE's code of each token;
- raw activations x [n, d_in]: the mean of the hook activations (the dense baseline's input).

A binary dataset is one task (positive class: the second of the sorted labels); a multi-class dataset
is one task per class c, class c against a seeded sample of the other classes of the same size
(balanced, chance 0.5, as SAEBench builds its one-vs-rest tasks). Each task is split once,
stratified and seeded (``sklearn.model_selection.train_test_split``), into train and test.

On the train split, latents are ranked by the class-mean difference ``|mean(z_i | y=1) - mean(z_i | y=0)|``
(ties by index) and the top k kept, for k in ``ks``. The probe is scikit-learn's
``LogisticRegression(C=1, max_iter=1000)`` after ``StandardScaler`` fitted on train; its test accuracy
(threshold 0.5) and ROC AUC (of the decision function) are reported. Baselines, the same recipe on:

- ``dense``: all raw dimensions;
- ``raw`` top-k: the k raw dimensions with the largest class-mean difference.

Metrics: per dataset the mean over its tasks, then the mean over datasets (each dataset weighs the
same). The 95 % interval of an averaged accuracy is a normal approximation to the binomial sampling of
the test sets: Var = sum_d (mean_t p_t (1 - p_t) / n_t / T_d) / D^2 over the D datasets with T_d tasks
(it leaves out the split's and the latent selection's randomness, so it is a lower bound on the noise).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sae_mlops.evals.datasets import LabelledDataset

log = logging.getLogger(__name__)

KS = (1, 2, 5, 10, 20, 50)
Z95 = 1.959963984540054


@dataclass
class Task:
    """One binary probing task: rows of the dataset, their 0/1 labels, and the split."""

    dataset: str
    name: str  # the positive class
    train: np.ndarray  # row indices
    test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@dataclass
class ProbeResult:
    table: pd.DataFrame  # one row per (dataset, task, representation, k)
    metrics: dict[str, float]
    datasets: list[str]
    seconds: dict[str, float] = field(default_factory=dict)


def make_tasks(ds: LabelledDataset, test_fraction: float, seed: int) -> list[Task]:
    """The binary tasks of a dataset with their stratified, seeded splits (see the module docstring)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(ds.labels)
    classes = ds.classes
    rng = np.random.default_rng(seed)
    specs: list[tuple[str, np.ndarray, np.ndarray]] = []
    if len(classes) == 2:
        idx = np.arange(len(labels))
        specs.append((classes[1], idx, (labels == classes[1]).astype(np.int64)))
    else:
        for c in classes:
            pos = np.flatnonzero(labels == c)
            rest = np.flatnonzero(labels != c)
            neg = np.sort(rng.choice(rest, size=min(len(pos), len(rest)), replace=False))
            idx = np.concatenate([pos, neg])
            specs.append((c, idx, np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])))
    tasks = []
    for name, idx, y in specs:
        tr, te, ytr, yte = train_test_split(idx, y, test_size=test_fraction, stratify=y, random_state=seed)
        tasks.append(Task(ds.name, name, np.asarray(tr), np.asarray(te), np.asarray(ytr), np.asarray(yte)))
    return tasks


def top_by_mean_difference(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns of `x` with the largest ``|mean(x | y=1) - mean(x | y=0)|`` (stable ties)."""
    diff = np.abs(x[y == 1].astype(np.float64).mean(0) - x[y == 0].astype(np.float64).mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> tuple[float, float]:
    """(test accuracy, test ROC AUC) of StandardScaler + LogisticRegression(C=1, max_iter=1000)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    clf.fit(x_train, y_train)
    acc = float(accuracy_score(y_test, clf.predict(x_test)))
    auc = float(roc_auc_score(y_test, clf.decision_function(x_test))) if len(set(y_test.tolist())) == 2 else float("nan")
    return acc, auc


def probe_task(task: Task, codes: np.ndarray, raw: np.ndarray, ks: tuple[int, ...]) -> list[dict]:
    """Rows of the results table for one task: SAE top-k, raw top-k and the dense baseline."""
    rows = []
    base = {"dataset": task.dataset, "task": task.name, "n_train": len(task.train), "n_test": len(task.test)}
    for rep, x in (("sae", codes), ("raw", raw)):
        xtr, xte = x[task.train], x[task.test]
        order = top_by_mean_difference(xtr, task.y_train, x.shape[1])
        for k in ks:
            if k > x.shape[1]:
                continue
            cols = order[:k]
            acc, auc = fit_probe(xtr[:, cols], task.y_train, xte[:, cols], task.y_test)
            rows.append({**base, "representation": rep, "k": k, "accuracy": acc, "auc": auc,
                         "latents": ",".join(map(str, cols.tolist())) if rep == "sae" else ""})
    acc, auc = fit_probe(raw[task.train], task.y_train, raw[task.test], task.y_test)
    rows.append({**base, "representation": "dense", "k": raw.shape[1], "accuracy": acc, "auc": auc, "latents": ""})
    return rows


def probe_dataset(ds: LabelledDataset, codes: np.ndarray, raw: np.ndarray, ks: tuple[int, ...], test_fraction: float,
                  seed: int) -> list[dict]:
    rows: list[dict] = []
    for task in make_tasks(ds, test_fraction, seed):
        rows += probe_task(task, codes, raw, ks)
    return rows


def _name(rep: str, stat: str, k: int | None) -> str:
    return f"{rep}_{stat}" if k is None else f"{rep}_{stat}_k{k}"


def probe_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``probe/<dataset>/<rep>_<acc|auc>[_k<k>]`` per dataset, ``probe/<rep>_<acc|auc>[_k<k>]`` averaged
    over datasets, with ``_ci_low`` / ``_ci_high`` for the averaged accuracies (module docstring)."""
    out: dict[str, float] = {}
    datasets = list(dict.fromkeys(table["dataset"]))
    groups: dict[str, list[tuple[float, float, float]]] = {}  # name -> per dataset (acc, auc, var)
    for ds in datasets:
        sub = table[table["dataset"] == ds]
        for (rep, k), g in sub.groupby(["representation", "k"], sort=True):
            kk = None if rep == "dense" else int(k)
            acc, auc = float(g["accuracy"].mean()), float(g["auc"].mean())
            var = float(np.mean(g["accuracy"] * (1 - g["accuracy"]) / g["n_test"])) / len(g)
            out[f"probe/{ds}/{_name(rep, 'acc', kk)}"] = acc
            out[f"probe/{ds}/{_name(rep, 'auc', kk)}"] = auc
            groups.setdefault(_name(rep, "acc", kk), []).append((acc, auc, var))
    for name, vals in groups.items():
        if len(vals) != len(datasets):  # a k that not every dataset's representation reaches
            continue
        acc = float(np.mean([v[0] for v in vals]))
        half = Z95 * math.sqrt(sum(v[2] for v in vals)) / len(vals)
        out[f"probe/{name}"] = acc
        out[f"probe/{name}_ci_low"] = max(0.0, acc - half)
        out[f"probe/{name}_ci_high"] = min(1.0, acc + half)
        out[f"probe/{name.replace('_acc', '_auc')}"] = float(np.nanmean([v[1] for v in vals]))
    out["probe/datasets"] = float(len(datasets))
    out["probe/tasks"] = float(table[["dataset", "task"]].drop_duplicates().shape[0])
    return out
