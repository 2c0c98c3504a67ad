"""Intervals and verdicts (sae_mlops.core.blocks / collectors.blocks / intervals / verdicts) against
independent computations: per-block sums against per-token values recorded in the same pass and
grouped with pandas; the bootstrap against scipy.stats.bootstrap; coverage by simulation on the demo
corpus; an SAE against itself (within noise) and against a copy with a noisier decoder (worse)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from sae_mlops.core.blocks import BlockLayout, window_key
from sae_mlops.core.collectors.blocks import BlockStatsCollector
from sae_mlops.core.collectors.downstream import DownstreamCollector
from sae_mlops.core.collectors.reconstruction import ReconstructionCollector
from sae_mlops.core.collectors.sparsity import SparsityCollector
from sae_mlops.core.intervals import BlockSums, bootstrap_intervals, paired_differences, weights_of
from sae_mlops.core.verdicts import holm, judge, seed_floors

TOKENS = 30_000


class Recorder:
    """Records per analysed row: its window's (document, start), L0 and squared error; per prediction
    its window and CE with the SAE. An independent view of what the block collector sums."""

    name = "recorder"

    def __init__(self) -> None:
        self.rows: list[pd.DataFrame] = []
        self.preds: list[pd.DataFrame] = []

    def update(self, step: Any) -> None:
        b = step.batch
        win = b.analysed.nonzero(as_tuple=True)[0]
        starts = b.starts
        f = step.f.float()
        self.rows.append(pd.DataFrame({
            "doc": b.doc_index[win].numpy(), "start": starts[win].numpy(),
            "l0": (f != 0).sum(dim=1).numpy(), "sq_err": ((step.x - step.x_hat) ** 2).sum(dim=1).double().numpy(),
        }))
        pw = b.predicts.nonzero(as_tuple=True)[0]
        self.preds.append(pd.DataFrame({"doc": b.doc_index[pw].numpy(), "start": starts[pw].numpy(),
                                        "ce_sae": step.ce_sae.double().numpy()}))

    def merge(self, other: Any) -> None:  # pragma: no cover - one process
        raise NotImplementedError

    def compute(self) -> dict:
        return {}


def _inputs(sae: str = "standard", **kw: Any) -> Any:
    from sae_mlops.analyses.quick import prepare
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo.assets import demo_sae_path

    path = kw.pop("path", None) or str(demo_sae_path(sae))
    return prepare(AnalysisConfig(sae=path, model="demo", max_tokens=kw.pop("tokens", TOKENS), progress=False, **kw))


def _layout(inputs: Any, target: int) -> BlockLayout:
    from sae_mlops.core.tokens import iter_pools

    cfg = inputs.cfg
    keys = [window_key(w.doc_index, w.start) for pool in iter_pools(inputs.corpus.texts, inputs.model.tokenizer,
                                                                      inputs.plan, cfg.batch_size, cfg.max_tokens)
            for w in pool.windows]
    return BlockLayout.from_keys(keys, target)


def _pass(inputs: Any, layout: BlockLayout) -> tuple[list[Any], Recorder]:
    from sae_mlops.analyses.quick import run_pass

    info = inputs.sae.info
    rec = Recorder()
    collectors = [SparsityCollector(info.d_sae), ReconstructionCollector(info.d_in), DownstreamCollector(),
                  BlockStatsCollector(layout, info.d_in, info.d_sae), rec]
    run_pass(inputs, collectors)
    return collectors, rec


def _sums(c: BlockStatsCollector, plan: dict | None = None) -> BlockSums:
    return BlockSums(c.arrays(), c.d_in, c.d_sae, 1e-5, 0.1, plan or {"layout": c.layout.digest(), "corpus_digest": "x"})


@pytest.fixture(scope="module")
def demo_pass() -> dict[str, Any]:
    inputs = _inputs()
    layout = _layout(inputs, target=10**6)  # a block per window: slices of any size below
    collectors, rec = _pass(inputs, layout)
    return {"inputs": inputs, "layout": layout, "collectors": collectors, "rec": rec}


def test_layout_cuts_windows_in_stream_order() -> None:
    keys = [window_key(d, s) for d in range(10) for s in (0, 127)]
    lay = BlockLayout.from_keys(keys, target=6)
    assert lay.n_blocks == 5 and lay.windows == 20  # ceil(20 / 6) = 4 windows a block
    blocks = lay.block_of(torch.tensor([d for d in range(10) for _ in (0, 1)]), torch.tensor([0, 127] * 10))
    assert blocks.tolist() == [i // 4 for i in range(20)]
    assert BlockLayout.from_dict(lay.to_dict()) == lay and lay.digest() == BlockLayout.from_keys(keys, 6).digest()


def test_block_sums_are_the_per_token_values_grouped_by_block(demo_pass: dict) -> None:
    """Independent: per-token values recorded in the same pass, blocks assigned by searchsorted in
    numpy and summed with pandas."""
    layout, (sp, rc, ds, bl, rec) = demo_pass["layout"], demo_pass["collectors"]
    rows = pd.concat(rec.rows, ignore_index=True)
    starts = np.asarray(layout.starts)
    rows["block"] = np.searchsorted(starts, rows["doc"].to_numpy() * 2**32 + rows["start"].to_numpy(), side="right") - 1
    got = rows.groupby("block").agg(n=("l0", "size"), l0=("l0", "sum"), err=("sq_err", "sum")).reindex(range(layout.n_blocks), fill_value=0)
    assert bl.n_tokens.tolist() == got["n"].tolist()
    assert np.allclose(bl.sum_l0.numpy(), got["l0"].to_numpy(), rtol=0, atol=1e-9)
    assert np.allclose(bl.sum_sq_err.numpy(), got["err"].to_numpy(), rtol=1e-9)
    preds = pd.concat(rec.preds, ignore_index=True)
    preds["block"] = np.searchsorted(starts, preds["doc"].to_numpy() * 2**32 + preds["start"].to_numpy(), side="right") - 1
    ce = preds.groupby("block")["ce_sae"].agg(["size", "sum"]).reindex(range(layout.n_blocks), fill_value=0)
    assert bl.n_pred.tolist() == ce["size"].tolist() and np.allclose(bl.sum_ce_sae.numpy(), ce["sum"].to_numpy(), rtol=1e-9)
    # summed over blocks, they are the collectors' own sums; the metrics recomputed from them are theirs
    assert int(bl.fire_count.sum(0).long().sub(sp.fire_count).abs().sum()) == 0
    point = _sums(bl).point()
    for c in (sp, rc, ds):
        for k, v in c.compute().items():
            assert point[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_bootstrap_interval_agrees_with_scipy(demo_pass: dict) -> None:
    """Our resampling of sums against scipy.stats.bootstrap (percentile) of the ratio of block sums."""
    from scipy.stats import bootstrap

    bl = demo_pass["collectors"][3]
    sums = _sums(bl)
    ours = bootstrap_intervals(sums, resamples=20000, seed=1)
    n, err, l0 = bl.n_tokens.double().numpy(), bl.sum_sq_err.numpy(), bl.sum_l0.numpy()
    for name, num in (("recon/mse_per_token", err), ("sparsity/l0_mean", l0)):
        ref = bootstrap((num, n), lambda a, b, axis=-1: a.sum(axis=axis) / b.sum(axis=axis), paired=True, vectorized=True,
                        n_resamples=20000, method="percentile", rng=np.random.default_rng(2))
        width = ref.confidence_interval.high - ref.confidence_interval.low
        assert width > 0
        assert abs(ours[name].low - ref.confidence_interval.low) < 0.05 * width, name
        assert abs(ours[name].high - ref.confidence_interval.high) < 0.05 * width, name
        assert ours[name].low < ours[name].value < ours[name].high


def test_coverage_on_disjoint_slices_of_the_demo_corpus(demo_pass: dict) -> None:
    """Coverage by simulation: cut the pass (a block per window) into disjoint slices of 20 blocks
    taken across the corpus (slice i holds blocks i, i + S, i + 2S, ...: a spread sample, as a budget
    taken from a shuffled corpus is); each slice's 95 % interval, from its own blocks only, should
    contain the whole pass's value about 95 % of the time. Deterministic (fixed seeds); the figure is
    printed for the record. (Contiguous slices of the demo corpus, which is ordered by module, cover
    far less: a budget cut from an ordered corpus is not a sample of it - see the docs.)"""
    bl = demo_pass["collectors"][3]
    full = _sums(bl)
    truth = full.point()
    metrics = ["sparsity/l0_mean", "sparsity/l1_mean", "recon/mse_per_token", "recon/explained_variance", "recon/cosine",
               "downstream/ce_sae", "downstream/loss_recovered", "downstream/kl_sae"]
    per = 20
    n_slices = full.n_blocks // per
    hits, trials = 0, 0
    for i in range(n_slices):
        take = np.arange(i, n_slices * per, n_slices)
        part = BlockSums({k: v[take] for k, v in full.arrays.items()}, full.d_in, full.d_sae, 1e-5, 0.1, {})
        iv = bootstrap_intervals(part, resamples=1000, seed=i)
        for m in metrics:
            trials += 1
            hits += iv[m].low <= truth[m] <= iv[m].high
    coverage = hits / trials
    print(f"coverage {coverage:.3f} over {trials} slice intervals")
    assert trials >= 120 and 0.88 <= coverage <= 0.99


def test_weights_and_holm_and_seed_floors() -> None:
    idx = np.array([[0, 0, 2], [1, 2, 2]])
    assert weights_of(idx, 3).tolist() == [[2, 0, 1], [0, 1, 2]]
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, float("nan")]
    assert holm(p)[:3] == pytest.approx(list(multipletests(p[:3], method="holm")[1])) and math.isnan(holm(p)[3])
    # two recipes of 3 seeds: pooled SD of the six deviations, t(4) * s * sqrt(2)
    groups = {"a": [{"m": 1.0}, {"m": 2.0}, {"m": 3.0}], "b": [{"m": 10.0}, {"m": 10.0}, {"m": 13.0}], "c": [{"m": 5.0}]}
    s = math.sqrt((2.0 + 6.0) / 4)
    from scipy.stats import t

    assert seed_floors(groups, ["m"])["m"] == pytest.approx(t.ppf(0.975, 4) * s * math.sqrt(2))
    assert seed_floors({"a": [{"m": 1.0}]}, ["m"]) == {}


def _noisy_copy(tmp: Path, scale: float) -> Path:
    from sae_mlops.demo.assets import demo_sae_path

    out = tmp / "sae_noisy"
    shutil.copytree(demo_sae_path("standard"), out)
    w = torch.load(out / "weights.pt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    w["W_dec"] = w["W_dec"] + scale * w["W_dec"].std() * torch.randn(w["W_dec"].shape, generator=gen)
    torch.save(w, out / "weights.pt")
    return out


def test_self_is_within_noise_and_a_noisier_decoder_is_worse(demo_pass: dict, tmp_path: Path) -> None:
    ref = _sums(demo_pass["collectors"][3])
    noisy_inputs = _inputs(path=str(_noisy_copy(tmp_path, 0.3)))
    (_, _, _, bl, _), _ = _pass(noisy_inputs, demo_pass["layout"])
    noisy = _sums(bl)
    rows = judge(("standard", ref), [("itself", ref), ("noisy decoder", noisy)], resamples=2000)
    self_rows = [r for r in rows if r.variant == "itself"]
    assert self_rows and all(r.verdict == "within noise" and r.diff == 0 and r.paired for r in self_rows)
    worse = {r.metric: r for r in rows if r.variant == "noisy decoder"}
    for m in ("recon/mse_per_token", "recon/explained_variance", "recon/cosine", "downstream/ce_sae",
              "downstream/loss_recovered", "downstream/kl_sae"):
        assert worse[m].verdict == "worse", (m, worse[m])
    assert worse["recon/mse_per_token"].diff > 0 and worse["recon/explained_variance"].diff < 0
    assert worse["downstream/loss_recovered"].high < 0 < worse["downstream/ce_sae"].low
    assert worse["sparsity/l0_mean"].verdict == "within noise"  # the encoder is unchanged: same codes
    # paired intervals are far tighter than unpaired ones on the same pair
    paired = {d.metric: d for d in paired_differences(noisy, ref, resamples=2000)}
    unpaired = {d.metric: d for d in paired_differences(noisy, ref, resamples=2000, force_unpaired=True)}
    m = "downstream/ce_sae"
    assert paired[m].paired and not unpaired[m].paired
    assert (paired[m].high - paired[m].low) < 0.5 * (unpaired[m].high - unpaired[m].low)
