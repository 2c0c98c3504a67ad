"""Activation database: what is written equals what went in; queries answer correctly; interrupted
writes never look complete."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_mlops.outputs.activation_db.reader import ActivationDB
from sae_mlops.outputs.activation_db.writer import ActivationDBWriter
from sae_mlops.core.collectors.base import StepData
from sae_mlops.errors import InputError
from sae_mlops.core.tokens import Window, WindowPlan, collate

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


def test_parts_written_in_the_background_are_every_row_in_order_and_flush_waits_for_them(tmp_path):
    import threading

    import pyarrow.parquet as pq

    steps = _steps(seed=3)
    w = ActivationDBWriter(tmp_path / "activation_database" / "activation_db_z", d_sae=6, shard_rows=5)
    for s in steps:
        w.update(s)
    w.flush()  # every part on disk when it returns, and no writer thread left behind
    assert w._pending is None and not any(t.name.startswith("activation-db") for t in threading.enumerate())
    parts = sorted((w.partial / "activations").glob("*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(w.shards)] and w.shards == len(steps)
    acts = pq.read_table(parts).to_pandas()  # in part order: the stream order
    f = torch.cat([s.f for s in steps])
    rows, cols = (f != 0).nonzero(as_tuple=True)
    assert acts.token_index.tolist() == rows.tolist() and acts.feature.tolist() == cols.tolist()
    tokens = pq.read_table(sorted((w.partial / "tokens").glob("*.parquet"))).to_pandas()
    assert tokens.token_index.tolist() == list(range(f.shape[0]))


def test_a_failed_background_write_is_raised_not_lost(tmp_path):
    import shutil

    steps = _steps(seed=4)
    w = ActivationDBWriter(tmp_path / "activation_database" / "activation_db_e", d_sae=6, shard_rows=5)
    shutil.rmtree(w.partial / "tokens")  # the part written in the background cannot be created
    w.update(steps[0])  # fills the buffer: its write starts in the background and fails there
    with pytest.raises(OSError):
        w.flush()
    assert w._pool is None  # the writer thread is stopped whether the write failed or not
    w.abort()
    assert not w.partial.exists()


# --- the query surface: one read-only statement, no file outside the database ---------------


@pytest.fixture()
def sandboxed(tmp_path):
    root, _ = _build(tmp_path / "analysis", _steps(seed=2))
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.csv"
    secret.write_text("user,password\nroot,hunter2\n")
    return ActivationDB(tmp_path / "analysis"), root, outside, secret


def test_every_view_answers_a_legitimate_query(sandboxed):
    db, root, _, _ = sandboxed
    expected = {
        "tokens": db.manifest["n_tokens"],
        "activations": db.manifest["nnz"],
        "features": 6,
        "vocab": len(VOCAB),
    }
    for view, n in expected.items():
        assert int(db.sql(f"SELECT count(*) AS n FROM {view}").n[0]) == n, view
    joined = db.sql(
        "WITH a AS (SELECT token_index, max(value) AS v FROM activations GROUP BY token_index) "
        "SELECT t.doc_index, count(*) AS n FROM a JOIN tokens t USING (token_index) "
        "JOIN vocab v ON v.token_id = t.token_id GROUP BY t.doc_index ORDER BY t.doc_index"
    )
    assert joined.n.sum() == db.sql("SELECT count(DISTINCT token_index) AS n FROM activations").n[0]
    assert list(db.sql("DESCRIBE features").column_name)[:1] == ["feature"]
    # a file inside the database directory may be read (the views do exactly that)
    assert len(db.sql(f"SELECT * FROM read_parquet('{root.as_posix()}/features.parquet')")) == 6


@pytest.mark.parametrize(
    "query, words",
    [
        ("COPY (SELECT * FROM vocab) TO '{outside}/stolen.csv'", "not COPY"),
        ("COPY (SELECT * FROM vocab) TO '{root}/inside.csv'", "not COPY"),
        ("EXPORT DATABASE '{outside}/dump'", "not EXPORT"),
        ("SELECT * FROM read_csv('{secret}')", "outside the database directory"),
        ("SELECT * FROM read_text('{secret}')", "outside the database directory"),
        ("SELECT * FROM read_blob('{secret}')", "outside the database directory"),
        ("SELECT * FROM read_csv('/etc/passwd')", "outside the database directory"),
        ("SELECT * FROM read_parquet('{root}/../../../outside/secret.csv')", "outside the database directory"),
        ("SELECT * FROM glob('{outside}/*')", "outside the database directory"),
        ("SELECT 1; SELECT 2", "2 statements"),
        ("SELECT 1; DROP VIEW tokens", "2 statements"),
        ("DROP VIEW tokens", "not DROP"),
        ("CREATE TABLE t AS SELECT * FROM tokens", "not CREATE"),
        ("CREATE MACRO m(x) AS x", "not CREATE"),
        ("ALTER VIEW tokens RENAME TO t", "not ALTER"),
        ("INSERT INTO features SELECT * FROM features", "not INSERT"),
        ("SET enable_external_access = true", "not SET"),
        ("RESET lock_configuration", "not SET"),
        ("PRAGMA version", "not PRAGMA"),
        ("ATTACH '{outside}/other.duckdb' AS other", "not ATTACH"),
        ("INSTALL httpfs", "not LOAD"),
        ("LOAD httpfs", "not LOAD"),
        ("CALL pragma_version()", "not CALL"),
        ("EXPLAIN SELECT 1", "not EXPLAIN"),
        ("", "empty"),
        ("SELEC 1", "does not parse"),
    ],
)
def test_query_surface_refuses(sandboxed, query, words):
    db, root, outside, secret = sandboxed
    before = sorted(p.name for p in outside.iterdir()), sorted(p.name for p in root.rglob("*"))
    with pytest.raises(InputError, match=words):
        db.sql(query.format(outside=outside.as_posix(), root=root.as_posix(), secret=secret.as_posix()))
    assert (sorted(p.name for p in outside.iterdir()), sorted(p.name for p in root.rglob("*"))) == before
    assert int(db.sql("SELECT count(*) AS n FROM tokens").n[0]) == db.manifest["n_tokens"]  # views intact


def test_connection_configuration_is_locked(sandboxed):
    import duckdb

    db, _, _, secret = sandboxed
    with pytest.raises(duckdb.Error, match="locked"):
        db.con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        db.con.execute(f"SELECT * FROM read_csv('{secret.as_posix()}')").fetchall()
