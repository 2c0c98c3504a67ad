"""Streaming top-k examples equal a full sort of the corpus, ties broken by token order."""

from __future__ import annotations

import pytest
import torch

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.examples import TopExamplesCollector
from sae_mlops.core.tokens import Window, WindowPlan, collate

PLAN = WindowPlan(context_size=12, prepend_bos=True, bos_id=0, pad_id=0, special_ids=[0])


def _batches(seed: int, n_batches: int = 5, d_sae: int = 7, signed: bool = False):
    g = torch.Generator().manual_seed(seed)
    out, doc = [], 0
    for _ in range(n_batches):
        windows = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            length = int(torch.randint(2, 12, (1,), generator=g))
            ids = torch.randint(1, 50, (length - 1,), generator=g).tolist()
            windows.append(Window(doc, 3 * doc, [0, *ids], True))
            doc += 1
        batch = collate(windows, PLAN)
        n = batch.n_analysed
        # few distinct values -> many ties; zeros are "did not fire"
        f = torch.randint(0, 4, (n, d_sae), generator=g).float()
        if signed:  # codes of either sign, fractional, with ties: e.g. an SAE without a ReLU
            signs = torch.tensor([-1.5, -1.0, -0.25, -0.5, -2.0, -3.0, 0.5, -0.75])
            f = f * signs[torch.randint(0, len(signs), (n, d_sae), generator=g)]
        out.append((batch, f))
    return out


def _reference(batches, k, window):
    """Naive: list every firing (value, token index) and sort; contexts from the padded window."""
    rows, start = [], 0
    for batch, f in batches:
        flat = batch.analysed.nonzero().tolist()
        for i, (b, pos) in enumerate(flat):
            for feat in range(f.shape[1]):
                if f[i, feat] != 0:
                    ctx = []
                    for j in range(pos - window, pos + window + 1):
                        ok = 0 <= j < batch.tokens.shape[1] and bool(batch.valid[b, j]) and int(batch.doc_pos[b, j]) >= 0
                        ctx.append(int(batch.tokens[b, j]) if ok else -1)
                    rows.append((feat, float(f[i, feat]), start + i, int(batch.doc_index[b]), int(batch.doc_pos[b, pos]), ctx))
        start += len(flat)
    ref = {}
    for feat in range(batches[0][1].shape[1]):
        mine = sorted([r for r in rows if r[0] == feat], key=lambda r: (-r[1], r[2]))[:k]
        ref[feat] = [{"activation": r[1], "global_idx": r[2], "text_idx": r[3], "position": r[4], "context_ids": r[5]} for r in mine]
    return ref


def _feed(collector, batches, start=0):
    for batch, f in batches:
        collector.update(StepData(batch=batch, x=torch.zeros(len(f), 1), f=f, x_hat=torch.zeros(len(f), 1), token_start=start))
        start += len(f)
    return start


def _assert_equals_full_sort(batches, d_sae: int, k: int, window: int) -> dict:
    """Stream ``batches`` through a collector and compare every feature's examples with the naive
    full sort; returns the reference."""
    c = TopExamplesCollector(d_sae=d_sae, k=k, window=window)
    _feed(c, batches)
    ref = _reference(batches, k, window=window)
    for feat in range(d_sae):
        assert c.examples(feat) == ref[feat], feat
    return ref


@pytest.mark.parametrize("k", [1, 3, 25])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_topk_equals_sorting_everything(k, seed):
    _assert_equals_full_sort(_batches(seed), d_sae=7, k=k, window=2)


@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("seed", [3, 4])
def test_a_long_stream_with_examples_entering_between_kept_ones_equals_sorting_everything(k, seed):
    """Forty batches: once a feature's top-k is full, later examples enter between kept ones (or at
    ties behind them) and push the last ones out; each state's slots are shifted, not re-sorted."""
    _assert_equals_full_sort(_batches(seed, n_batches=40, d_sae=9), d_sae=9, k=k, window=2)


@pytest.mark.parametrize("seed", [5, 6])
def test_codes_of_either_sign_are_ranked_by_value_as_a_full_sort_ranks_them(seed):
    batches = _batches(seed, n_batches=12, d_sae=5, signed=True)
    assert any(bool((f < 0).any()) for _, f in batches)
    ref = _assert_equals_full_sort(batches, d_sae=5, k=25, window=1)  # k beyond the positive codes
    assert any(e["activation"] < 0 for feat in range(5) for e in ref[feat])  # negative codes are kept


def test_the_sort_key_orders_by_feature_then_value_descending():
    from sae_mlops.core.collectors.examples import _feature_value_key

    g = torch.Generator().manual_seed(0)
    vals = torch.cat([torch.randn(500, generator=g) * torch.logspace(-30, 30, 500),
                      torch.tensor([float("inf"), float("-inf"), 1e-45, -1e-45, 3.0, 3.0, -3.0])])
    feats = torch.randint(0, 7, (len(vals),), generator=g)
    order = torch.argsort(_feature_value_key(feats, vals), stable=True).tolist()
    expected = sorted(range(len(vals)), key=lambda i: (int(feats[i]), -float(vals[i]), i))
    assert order == expected


def test_merge_of_shards_equals_one_stream():
    batches = _batches(5, n_batches=6)
    whole = TopExamplesCollector(7, k=4, window=1)
    _feed(whole, batches)
    a, b = TopExamplesCollector(7, k=4, window=1), TopExamplesCollector(7, k=4, window=1)
    start = _feed(a, batches[:3])
    _feed(b, batches[3:], start)
    a.merge(b)
    for feat in range(7):
        assert a.examples(feat) == whole.examples(feat)
