"""Activation database: what is written equals what went in; queries answer correctly; interrupted
writes never look complete."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_mlops.actdb.reader import ActivationDB
from sae_mlops.actdb.writer import ActivationDBWriter
from sae_mlops.collectors.base import StepData
from sae_mlops.errors import InputError
from sae_mlops.tokens import Window, WindowPlan, collate

PLAN = WindowPlan(context_size=8, prepend_bos=True, bos_id=0, pad_id=0, special_ids=[0])
VOCAB = ["<bos>"] + [f" w{i}" for i in range(1, 30)]


def _steps(d_sae=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps, start = [], 0
    for b in range(4):
        windows = [Window(2 * b + j, 7 * j, [0, *torch.randint(1, 30, (5 + j,), generator=g).tolist()], True) for j in range(2)]
        batch = collate(windows, PLAN)
        n = batch.n_analysed
        f = torch.rand(n, d_sae, generator=g) * (torch.rand(n, d_sae, generator=g) < 0.4)
        steps.append(StepData(batch=batch, x=torch.zeros(n, 1), f=f, x_hat=torch.zeros(n, 1), token_start=start))
        start += n
    return steps


def _build(tmp_path, steps, shard_rows=10):
    w = ActivationDBWriter(tmp_path / "activation_database" / "activation_db_x", d_sae=6, shard_rows=shard_rows)
    for s in steps:
        w.update(s)
    assert not w.root.exists()  # nothing published before finalize
    f = torch.cat([s.f for s in steps])
    per_feature = {"firing_count": (f != 0).sum(0).tolist()}
    return w.finalize(per_feature, VOCAB), f


def test_contents_round_trip(tmp_path):
    steps = _steps()
    root, f = _build(tmp_path, steps)
    db = ActivationDB(tmp_path)  # finds the newest complete database below a directory
    assert db.root == root and db.manifest["shards"] > 1
    acts = db.sql("SELECT * FROM activations ORDER BY token_index, feature")
    rows, cols = (f != 0).nonzero(as_tuple=True)
    assert acts.token_index.tolist() == rows.tolist() and acts.feature.tolist() == cols.tolist()
    np.testing.assert_allclose(acts.value, f[rows, cols].numpy())
    toks = db.sql("SELECT * FROM tokens ORDER BY token_index")
    expect_doc = torch.cat([s.batch.doc_index[:, None].expand_as(s.batch.analysed)[s.batch.analysed] for s in steps])
    expect_pos = torch.cat([s.batch.doc_pos[s.batch.analysed] for s in steps])
    assert toks.doc_index.tolist() == expect_doc.tolist() and toks.position.tolist() == expect_pos.tolist()
    np.testing.assert_allclose(db.csr().toarray(), f.numpy())


def test_queries(tmp_path):
    steps = _steps(seed=1)
    _, f = _build(tmp_path, steps)
    db = ActivationDB(tmp_path)
    top = db.top_activations(2, k=3, context=2)
    vals = f[:, 2][f[:, 2] != 0].sort(descending=True).values[:3]
    np.testing.assert_allclose(top.value, vals.numpy(), rtol=1e-6)
    assert all("[[" in c and "]]" in c for c in top.context)
    on_tok = db.features_on_token(token_index=0)
    assert set(on_tok.feature) == set((f[0] != 0).nonzero().flatten().tolist())
    per_doc = db.document_counts(2)
    assert per_doc.n_fired.sum() == int((f[:, 2] != 0).sum())
    in_doc = db.features_in_document(0)
    assert (in_doc.n_tokens > 0).all()
    with pytest.raises(InputError, match="out of range"):
        db.top_activations(99)


def test_interrupted_database_is_not_found_as_complete(tmp_path):
    w = ActivationDBWriter(tmp_path / "activation_database" / "activation_db_y", d_sae=6, shard_rows=5)
    for s in _steps():
        w.update(s)
    # simulated crash: finalize never runs
    with pytest.raises(InputError, match="incomplete"):
        ActivationDB(tmp_path / "activation_database")
