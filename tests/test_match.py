"""Feature matching (sae_mlops.features.match): block-wise decoder cosines and activation
correlations against dense numpy, the one-to-one assignment, and a known answer end to end (B is a
permutation of A with decoder noise: every feature must be matched to its preimage), logged to MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from feature_fixtures import permuted_sae, shared_demo_full
from scipy.optimize import linear_sum_assignment

from sae_mlops.features import match as M


def unit(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w, axis=1, keepdims=True)


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_decoder_best_matches_equal_dense_numpy(block: int) -> None:
    rng = np.random.default_rng(0)
    wa, wb = rng.normal(size=(50, 16)), rng.normal(size=(70, 16)) * 3.0
    c = unit(wa) @ unit(wb).T
    best = M.decoder_best_matches(wa, wb, block=block)
    np.testing.assert_array_equal(best.a_index, c.argmax(axis=1))
    np.testing.assert_allclose(best.a_value, c.max(axis=1), atol=1e-5)
    np.testing.assert_array_equal(best.b_index, c.argmax(axis=0))
    np.testing.assert_allclose(best.b_value, c.max(axis=0), atol=1e-5)


def test_assignment_equals_scipy_on_dense_and_respects_limit() -> None:
    rng = np.random.default_rng(1)
    wa, wb = rng.normal(size=(30, 8)), rng.normal(size=(40, 8))
    c = unit(wa) @ unit(wb).T
    rows, cols = linear_sum_assignment(c, maximize=True)
    got = M.decoder_assignment(wa, wb, limit=40)
    assert got is not None and len(got) == 30
    np.testing.assert_allclose(got["cosine"].sum(), c[rows, cols].sum(), atol=1e-4)
    assert M.decoder_assignment(wa, wb, limit=39) is None


def test_permutation_plus_noise_is_recovered() -> None:
    rng = np.random.default_rng(2)
    wa = rng.normal(size=(300, 32))
    perm = rng.permutation(300)
    wb = wa[perm] + 0.05 * rng.normal(size=wa.shape)  # feature j of B is feature perm[j] of A
    best = M.decoder_best_matches(wa, wb, block=64)
    np.testing.assert_array_equal(best.b_index, perm)
    np.testing.assert_array_equal(best.a_index[perm], np.arange(300))
    assign = M.decoder_assignment(wa, wb)
    np.testing.assert_array_equal(assign.sort_values("feature_b")["feature_a"].to_numpy(), perm)
    res = M.MatchResult(300, 300, best, assign)
    m = M.summarise(res)
    assert m["match/share_a_cos_ge_0.9"] == 1.0 and m["match/mutual_best_pairs"] == 300


def test_activation_correlation_equals_numpy_corrcoef() -> None:
    rng = np.random.default_rng(3)
    n, da, db = 400, 23, 31
    x = rng.exponential(size=(n, da)) * (rng.random((n, da)) < 0.1)
    y = rng.exponential(size=(n, db)) * (rng.random((n, db)) < 0.1)
    y[:, 5] = 2.0 * x[:, 3] + 0.01 * x[:, 4]  # a near copy
    x[:, 7] = 0.0  # a dead feature: no correlation, no match
    best = M.activation_best_matches(sp.csr_matrix(x), sp.csr_matrix(y), block=5)
    r = np.corrcoef(x.T, y.T)[:da, da:]  # NaN rows for the dead feature
    rr = np.where(np.isnan(r), -np.inf, r)
    alive = np.arange(da) != 7
    np.testing.assert_array_equal(best.a_index[alive], rr.argmax(axis=1)[alive])
    np.testing.assert_allclose(best.a_value[alive], rr.max(axis=1)[alive], atol=1e-9)
    np.testing.assert_array_equal(best.b_index, rr.argmax(axis=0))
    np.testing.assert_allclose(best.b_value, rr.max(axis=0), atol=1e-9)
    assert best.a_index[7] == -1 and np.isnan(best.a_value[7])
    assert best.b_index[5] == 3 and best.b_value[5] > 0.99


def test_same_tokens_needs_equal_plan() -> None:
    p = dict.fromkeys(M.TOKEN_PLAN_PARAMS, "x")
    ok, why = M.same_tokens(p, {**p, "max_tokens": "y"}, None, None)
    assert not ok and "max_tokens" in why
    ok, why = M.same_tokens(p, dict(p), None, None)
    assert not ok and "activation database" in why


def _permuted_analysis(a: Path, b: Path, sae_b: Path, perm: np.ndarray) -> None:
    """B's analysis = A's files with the features renamed by perm (B's j = A's perm[j]) and B's SAE."""
    from sae_mlops.outputs.activation_db.reader import find_database
    from sae_mlops.sources.sae import load_sae

    shutil.copytree(a, b)
    inv = np.argsort(perm)
    res = next((b / "results").glob("analysis_results*.json"))
    doc = json.loads(res.read_text())
    doc["params"]["sae"] = str(sae_b)
    doc["params"]["sae_hash"] = load_sae(str(sae_b)).info.content_hash
    res.write_text(json.dumps(doc))
    stats = next((b / "results").glob("feature_stats*.parquet"))
    frame = pd.read_parquet(stats).sort_values("feature")
    frame = frame.iloc[perm].assign(feature=np.arange(len(perm)))
    frame.to_parquet(stats, index=False)
    csr = find_database(b) / "csr" / "indices.npy"
    np.save(csr, inv[np.load(csr)].astype(np.load(csr).dtype))


def test_match_end_to_end_known_permutation_logged(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_store: str) -> None:
    import mlflow
    from typer.testing import CliRunner

    from sae_mlops.cli import app
    from sae_mlops.demo import demo_sae_path

    src = demo_sae_path("standard")
    a = shared_demo_full(tmp_path_factory)
    perm = np.random.default_rng(4).permutation(512)
    sae_b = permuted_sae(src, tmp_path / "sae_b", perm, noise=0.05)
    _permuted_analysis(a, tmp_path / "B", sae_b, perm)
    out = tmp_path / "M"
    r = CliRunner().invoke(app, ["match", str(a), str(tmp_path / "B"), "--out", str(out), "--block", "100", "-q"])
    assert r.exit_code == 0, r.output
    pairs = pd.read_parquet(out / "matched_pairs.parquet")
    b_side = pairs[pairs.side == "b"].sort_values("feature")
    np.testing.assert_array_equal(b_side["match"].to_numpy(), perm)
    np.testing.assert_array_equal(b_side["assigned"].to_numpy(), perm)
    alive = b_side["alive"].to_numpy()
    np.testing.assert_array_equal(b_side["corr_match"].to_numpy()[alive], perm[alive])
    np.testing.assert_allclose(b_side["corr"].to_numpy()[alive], 1.0, atol=1e-6)
    summary = json.loads((out / "match_summary.json").read_text())
    assert summary["same_tokens"] and summary["metrics"]["match/share_a_cos_ge_0.9"] == 1.0
    assert summary["unmatched_a"] == [] and (out / "plots" / "match_histograms.png").stat().st_size > 1000
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`sae_mlops.kind` = 'match'", output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["sae_a"] == str(src) and run.data.params["sae_b"] == str(sae_b)
    assert run.data.metrics["match/share_b_cos_ge_0.7"] == 1.0 and run.data.metrics["match/mean_max_corr_a_to_b"] > 0.99
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [json.loads((out / "match_summary.json").read_text())["inputs"]["a"]["corpus_digest"][:16]]
    assert "analysis directory" in run.data.tags["mlflow.note.content"]
    names = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"matched_pairs.parquet", "assignment.parquet", "unmatched.parquet", "MATCH.md", "plots"} <= names
    # asked not to: no activation correlation, and the command says so
    r = CliRunner().invoke(app, ["match", str(a), str(tmp_path / "B"), "--out", str(tmp_path / "M2"), "--no-track", "--no-activations", "-q"])
    assert r.exit_code == 0 and "not computed" in r.output
    # compare --match over the two analyses as tracked full runs: the matrix says B is A permuted
    exp = mlflow.create_experiment("sweep")
    for name, root in (("A", a), ("B", tmp_path / "B")):
        with mlflow.start_run(experiment_id=exp, run_name=name):
            mlflow.set_tag("sae_mlops.kind", "full")
            mlflow.log_params({"sae": str(src if name == "A" else sae_b), "d_sae": 512})
            mlflow.log_metric("sparsity/l0_mean", 10.0)
            mlflow.log_artifacts(str(root))
    r = CliRunner().invoke(app, ["compare", "-e", "sweep", "--match", "--out", str(tmp_path / "C"), "-q"])
    assert r.exit_code == 0, r.output
    matrix = pd.read_csv(tmp_path / "C" / "matches" / "match_matrix.csv", index_col=0)
    assert matrix.shape == (2, 2) and (matrix.to_numpy() > 0.99).all()
    compare_run = mlflow.search_runs(experiment_ids=[exp], filter_string="tags.`sae_mlops.kind` = 'compare'", output_format="list")[0]
    logged = {f.path for f in mlflow.MlflowClient().list_artifacts(compare_run.info.run_id, "matches")}
    assert {"matches/match_matrix.csv", "matches/0_vs_1", "matches/plots"} <= logged
