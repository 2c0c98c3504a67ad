"""Ground truth (`sae-mlops synth`) and random baselines (`train --baseline`): a tiny synthetic world
where an SAE at the true dictionary scores MCC 1 and a random one does not, the report's statistics
against independent scipy/numpy computations, frozen parts unchanged by training, the grid on Ray equal
to the local grid, and the MLflow records end to end on a sqlite store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sae_mlops.config import SynthConfig
from sae_mlops.errors import InputError
from sae_mlops.training import synth as S

ROOT = Path(__file__).resolve().parents[1]

#: the tiny size of docs/guides/synth.md (seconds per recipe)
TINY = {"features": 32, "d_model": 16, "hierarchy_roots": 2, "correlation_rank": 4, "widths": "32", "k_values": "2",
        "l1_coefficients": "0.5", "l0_coefficients": "1", "training_samples": 4096, "eval_samples": 2000,
        "bootstrap_resamples": 200, "baselines": "none"}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    cfg = SynthConfig(**TINY)
    directory = tmp_path_factory.mktemp("world") / "world"
    digest = S.build_world(cfg, directory)
    return cfg, digest, S.world_files(directory)


def _topk_sae(d_in: int, d_sae: int, k: int):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))


def _mcc_numpy(w_dec: np.ndarray, truth: np.ndarray) -> float:
    """Independent MCC: |cosine| matrix in float64, one-to-one matching maximising the sum."""
    from scipy.optimize import linear_sum_assignment

    a = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    b = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    c = np.abs(a @ b.T)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].mean())


def test_true_dictionary_scores_mcc_one_and_a_random_sae_scores_low(tiny_world):
    from sae_lens.synthetic import init_sae_to_match_feature_dict

    cfg, _, files = tiny_world
    world = S.load_world(files)
    truth = world.feature_dict.feature_vectors.detach().numpy().astype(np.float64)

    at_truth = _topk_sae(cfg.d_model, cfg.features, k=4)
    init_sae_to_match_feature_dict(at_truth, world.feature_dict)
    got = S.score_sae(at_truth, world, 2000, 1000, seed=1)
    assert got["synth/mcc"] == pytest.approx(1.0, abs=1e-5)
    assert got["synth/mcc"] == pytest.approx(_mcc_numpy(at_truth.W_dec.detach().numpy().astype(np.float64), truth), abs=1e-5)
    assert got["synth/uniqueness"] == pytest.approx(1.0)

    random = _topk_sae(cfg.d_model, cfg.features, k=4)
    low = S.score_sae(random, world, 2000, 1000, seed=1)
    assert low["synth/mcc"] < 0.6
    assert low["synth/mcc"] == pytest.approx(_mcc_numpy(random.W_dec.detach().numpy().astype(np.float64), truth), abs=1e-5)
    assert low["synth/f1"] < got["synth/f1"]


def test_mse_and_cosine_against_numpy(tiny_world):
    cfg, _, files = tiny_world
    world = S.load_world(files)
    sae = _topk_sae(cfg.d_model, 32, k=3)
    torch.manual_seed(5)
    got = S.proxy_metrics(sae, world, samples=700, batch_size=300)  # 3 uneven batches
    torch.manual_seed(5)
    xs = [world.sample(n) for n in (300, 300, 100)]
    with torch.no_grad():
        x = torch.cat(xs).double().numpy()
        x_hat = torch.cat([sae.decode(sae.encode(b)) for b in xs]).double().numpy()
    mse = ((x - x_hat) ** 2).sum(axis=1).mean()
    cos = ((x * x_hat).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1))).mean()
    assert got["synth/mse"] == pytest.approx(mse, rel=1e-5)
    assert got["synth/cosine"] == pytest.approx(cos, rel=1e-5)


def test_grid_parsing_and_user_errors():
    recipes = S.parse_grid(SynthConfig(**{**TINY, "architectures": "topk,standard,jumprelu,matryoshka", "k_values": "2,4",
                                          "baselines": "frozen-decoder,frozen-encoder"}))
    names = [r.name for r in recipes]
    assert names == ["topk_w32_k2", "topk_w32_k4", "standard_w32_c0p5", "jumprelu_w32_c1", "matryoshka_w32_k2",
                     "matryoshka_w32_k4", "topk_w32_k2_frozen-decoder", "topk_w32_k4_frozen-decoder",
                     "topk_w32_k2_frozen-encoder", "topk_w32_k4_frozen-encoder"]
    with pytest.raises(InputError, match="--architectures"):
        S.parse_grid(SynthConfig(architectures="topk,gated"))
    with pytest.raises(InputError, match="--widths"):
        S.parse_grid(SynthConfig(widths="64,x"))
    with pytest.raises(InputError, match="exceeds width"):
        S.parse_grid(SynthConfig(widths="4", k_values="8"))
    with pytest.raises(InputError, match="--min-firing-prob"):
        SynthConfig(min_firing_prob=0.5, max_firing_prob=0.1)


# --- the report ---------------------------------------------------------------------------------


def _table(n: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    mcc = rng.uniform(0.3, 0.9, n)
    t = pd.DataFrame({
        "architecture": ["topk", "standard", "jumprelu"] * (n // 3),
        "baseline": [None] * (n - 1) + ["frozen-decoder"],
        "synth/mcc": mcc,
        "synth/f1": mcc * 0.5 + rng.normal(0, 0.05, n),
        "synth/explained_variance": rng.uniform(0.5, 0.95, n),
        "synth/mse": rng.uniform(0.1, 1.0, n),
        "synth/cosine": rng.uniform(0.7, 0.99, n),
        "synth/l0": np.round(rng.uniform(2, 20, n)),
        "synth/dead_fraction": -mcc + 1.0,  # perfectly anti-ranked with MCC: lower dead fraction = better
        "synth/shrinkage": rng.uniform(0.6, 1.0, n),
        "synth/train_loss": rng.uniform(0.1, 2.0, n),
    }, index=[f"r{i}" for i in range(n)])
    return t


def test_correlations_against_scipy_and_numpy():
    from scipy.stats import bootstrap, rankdata, spearmanr

    from sae_mlops.training.synth_report import correlations, picks

    table = _table()
    corr = correlations(table, resamples=500, seed=7)
    assert len(corr) == 14
    for row in corr.itertuples():
        x, y = table[row.proxy].to_numpy(float), table[row.truth].to_numpy(float)
        # Spearman = Pearson of mid-ranks (numpy), independent of scipy's spearmanr
        want = np.corrcoef(rankdata(x), rankdata(y))[0, 1]
        assert row.rho == pytest.approx(want, abs=1e-12)
        ci = bootstrap((x, y), lambda a, b: spearmanr(a, b).statistic, paired=True, vectorized=False, n_resamples=500,
                       method="percentile", rng=np.random.default_rng(7)).confidence_interval
        assert (row.low, row.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
        assert row.low <= row.rho <= row.high
    dead = corr[(corr.proxy == "synth/dead_fraction") & (corr.truth == "synth/mcc")].iloc[0]
    assert dead.rho == pytest.approx(-1.0) and dead.rho_aligned == pytest.approx(1.0)

    winner, p = picks(table, "synth/mcc")
    assert winner == table["synth/mcc"].idxmax()
    by = p.set_index("proxy")
    assert by.loc["synth/dead_fraction", "pick"] == winner and bool(by.loc["synth/dead_fraction", "agrees"])
    assert by.loc["synth/mse", "pick"] == table["synth/mse"].idxmin()
    assert by.loc["synth/explained_variance", "pick"] == table["synth/explained_variance"].idxmax()
    assert by.loc["synth/shrinkage", "pick"] == "" and by.loc["synth/shrinkage", "agrees"] is None


def test_report_files(tmp_path):
    from sae_mlops.training.synth_report import write_report

    table = _table()
    files, metrics, facts = write_report(table, tmp_path, world={"digest": "d", "features": 8, "d_model": 4, "world_seed": 0},
                                         resamples=200, seed=0, seconds=12.0)
    html = (tmp_path / "README.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == 2
    assert facts["winner_mcc"] == table["synth/mcc"].idxmax() and "dead_fraction" in facts["agreeing_proxies"]
    assert metrics["synth/rho_mcc_vs_dead_fraction"] == pytest.approx(-1.0)
    from sae_mlops.metrics import BY_NAME

    assert set(metrics) <= set(BY_NAME)
    assert pd.read_csv(tmp_path / "recipes.csv", index_col="recipe").shape[0] == len(table)
    scopes = pd.read_csv(tmp_path / "correlations.csv").groupby("scope")["n"].max()
    assert scopes["all recipes"] == len(table) and scopes.drop("all recipes").iloc[0] == len(table) - 1  # one baseline
    assert {f.name for f in files} >= {"README.md", "README.html", "correlations.csv", "picks.csv", "proxies_vs_mcc.png"}


# --- random baselines ---------------------------------------------------------------------------


def _unit(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w / w.norm(dim=dim, keepdim=True)


@pytest.mark.parametrize("baseline", ["frozen-decoder", "frozen-encoder", "soft-frozen-decoder"])
def test_baseline_frozen_part_is_unchanged_by_training(baseline, demo_assets, tmp_path):
    """On the demo model's real activations: the saved SAE's frozen tensors point where they started
    (SAELens folds the decoder norms into the saved TopK weights, so directions are compared); the
    trained part moved."""
    from safetensors.torch import load_file

    from sae_mlops.sources.sae import load_sae_directory
    from sae_mlops.training import TrainConfig, train_sae
    from sae_mlops.training.run import BASELINE_INIT_FILE

    cfg = TrainConfig(training_tokens=4096, batch_size_tokens=512, d_sae=64, k=4, baseline=baseline, device="cpu", seed=3)
    result = train_sae(cfg, tmp_path / "sae")
    init = load_file(str(result.sae_dir / BASELINE_INIT_FILE))
    saved = load_file(str(result.sae_dir / "sae_weights.safetensors"))
    if baseline == "frozen-decoder":
        assert torch.allclose(_unit(saved["W_dec"], 1), _unit(init["W_dec"], 1), atol=1e-6)
        assert result.summary["train/baseline_frozen_change"] == 0.0
    elif baseline == "frozen-encoder":
        assert torch.allclose(_unit(saved["W_enc"], 0), _unit(init["W_enc"], 0), atol=1e-6)
        assert torch.equal(saved["b_enc"] == 0, init["b_enc"] == 0)
        assert result.summary["train/baseline_frozen_change"] == 0.0
    else:
        cos = (_unit(saved["W_dec"], 1) * _unit(init["W_dec"], 1)).sum(dim=1)
        assert float(cos.min()) >= 0.8 - 1e-5 and float(cos.min()) < 0.999  # constrained, and it did move
    trained = "W_enc" if baseline != "frozen-encoder" else "W_dec"
    axis = 0 if trained == "W_enc" else 1
    start = init.get(trained)
    if start is not None:
        assert not torch.allclose(_unit(saved[trained], axis), _unit(start, axis), atol=1e-3)
    loaded = load_sae_directory(result.sae_dir)
    assert loaded.info.d_sae == 64


def test_synthetic_baseline_recipe_keeps_its_decoder(tiny_world):
    cfg, digest, files = tiny_world
    res = S.train_recipe(files, S.Recipe("topk", 32, k=2, baseline="frozen-decoder"), S.recipe_settings(cfg, digest))
    assert res.metrics["synth/baseline_frozen_change"] == 0.0


# --- Ray and MLflow -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 (2 CPUs, own process group, stopped at the end), as in test_scaleout."""
    import ray

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        mp.undo()


def test_grid_on_ray_equals_local(tiny_world, ray_head):
    cfg, digest, files = tiny_world
    cfg = SynthConfig(**{**TINY, "architectures": "topk,standard"})
    recipes = S.parse_grid(cfg)
    local = S.run_grid(cfg, files, recipes, digest)
    on_ray = S.run_grid(SynthConfig(**{**TINY, "architectures": "topk,standard", "executor": "ray", "ray_address": ray_head}),
                        files, recipes, digest)
    assert [r.recipe for r in on_ray] == recipes
    for a, b in zip(local, on_ray, strict=True):
        assert a.metrics.keys() == b.metrics.keys()
        for key in a.metrics:
            if key != "synth/train_seconds":
                assert a.metrics[key] == b.metrics[key], (a.recipe.name, key)
        assert a.files["sae_weights.safetensors"] == b.files["sae_weights.safetensors"]


def test_synth_and_log_records_world_grid_and_recipes(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from sae_mlops.sources.sae import load_sae_directory
    from sae_mlops.tracking import synth as T

    cfg = SynthConfig(**{**TINY, "architectures": "topk,standard", "baselines": "frozen-decoder"})
    first = S.synth_and_log(cfg, tmp_path / "one")
    client = MlflowClient()
    grid = client.get_run(first.grid_run_id)
    assert grid.data.tags[T.TAG_WORLD_DIGEST] == first.digest and grid.data.tags["sae_mlops.kind"] == "synth"
    assert grid.data.tags["sae_mlops.report_html"] == "report/README.html"
    assert grid.data.metrics["synth/recipes"] == 3.0
    assert {f.path for f in client.list_artifacts(first.grid_run_id, "report")} >= {"report/README.html", "report/recipes.csv"}
    world = client.get_run(first.world_run_id)
    assert world.data.tags["sae_mlops.kind"] == "synth-world" and not first.world_reused
    assert {f.path for f in client.list_artifacts(first.world_run_id, "world")} >= {"world/synthetic_model.safetensors"}
    assert set(first.recipe_run_ids) == {"topk_w32_k2", "standard_w32_c0p5", "topk_w32_k2_frozen-decoder"}
    for name, run_id in first.recipe_run_ids.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == first.grid_run_id
        assert run.data.tags[T.TAG_RECIPE] == name and run.data.tags[T.TAG_WORLD_RUN] == first.world_run_id
        assert run.data.tags.get("sae_mlops.baseline") == ("frozen-decoder" if "frozen" in name else None)
        assert run.data.metrics["synth/mcc"] == pytest.approx(float(first.table.loc[name, "synth/mcc"]))
        assert run.data.tags["sae_mlops.kind"] == "train" and run.data.tags.get("sae_mlops.logged_model_id")
        loaded = load_sae_directory(tmp_path / "one" / "saes" / name)  # the project's loader reads it
        assert loaded.info.d_in == cfg.d_model and loaded.info.d_sae == 32
    second = S.synth_and_log(cfg, tmp_path / "two")
    assert second.world_reused and second.world_run_id == first.world_run_id
    assert second.table["synth/mcc"].to_dict() == first.table["synth/mcc"].to_dict()


def test_cli_user_error_is_one_sentence(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "sae_mlops.cli", "synth", "--architectures", "topk,gated", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--architectures" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_random_directions_baseline_of_match():
    """The simulated mean max cosine of random unit vectors against an independent brute-force numpy
    estimate (other seed, whole matrix) and its monotonicity in width and d_in."""
    from sae_mlops.features.match import random_mean_max_cosine

    ab, ba = random_mean_max_cosine(128, 512, 512)
    assert random_mean_max_cosine(128, 512, 512) == (ab, ba)  # fixed seed
    rng = np.random.default_rng(1)
    a = rng.standard_normal((512, 128))
    b = rng.standard_normal((512, 128))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    brute = (a @ b.T).max(axis=1).mean()
    assert ab == pytest.approx(brute, abs=0.01) and ba == pytest.approx(brute, abs=0.01)
    wide, _ = random_mean_max_cosine(128, 512, 4096)
    narrow_space, _ = random_mean_max_cosine(512, 512, 512)
    assert wide > ab > narrow_space


def test_train_baseline_run_is_tagged(mlflow_store, demo_assets, tmp_path):
    from mlflow.tracking import MlflowClient

    from sae_mlops.training import TrainConfig, train_and_log

    cfg = TrainConfig(training_tokens=2048, batch_size_tokens=512, d_sae=64, k=4, baseline="frozen-encoder", device="cpu")
    outcome = train_and_log(cfg, tmp_path / "sae")
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.tags["sae_mlops.baseline"] == "frozen-encoder" and "baseline frozen-encoder" in run.info.run_name
    assert run.data.metrics["train/baseline_frozen_change"] == 0.0
    assert run.data.params["baseline"] == "frozen-encoder"
    with pytest.raises(InputError, match="--baseline 'random-everything' is not a baseline; use one of frozen-decoder"):
        TrainConfig(baseline="random-everything")
    # the name for the baseline with random activation patterns is the frozen encoder
    assert TrainConfig(baseline="random-activations").baseline == "frozen-encoder"
