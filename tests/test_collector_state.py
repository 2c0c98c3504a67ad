"""Declared collector state: a stream cut into shards, each shard's state saved and loaded through
safetensors + JSON, merged in shard order, equals one collector fed the whole stream."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sae_mlops.core.collectors.base import StepData
from sae_mlops.core.collectors.cooccurrence import CooccurrenceCollector
from sae_mlops.core.collectors.downstream import DownstreamCollector
from sae_mlops.core.collectors.examples import TopExamplesCollector
from sae_mlops.core.collectors.reconstruction import ReconstructionCollector
from sae_mlops.core.collectors.sparsity import SparsityCollector
from sae_mlops.core.collectors.state import (
    StateCollector,
    TopK,
    load_states,
    merge_saved_states,
    save_states,
    state_paths,
)
from sae_mlops.core.tokens import Window, WindowPlan, collate

PLAN = WindowPlan(context_size=12, prepend_bos=True, bos_id=0, pad_id=0, special_ids=[0])
D_SAE, D_IN, K, WINDOW = 9, 5, 3, 2
CUTS = [(0, 2), (2, 3), (3, 7)]  # three shards of whole batches, uneven


def _stream(seed: int = 0, n_batches: int = 7, d_sae: int = D_SAE) -> list[StepData]:
    """Real token batches (collate) with random codes: few distinct values (many ties, within and
    across shards), some negative, most zero; x/x_hat and per-token CE/KL of real magnitudes."""
    g = torch.Generator().manual_seed(seed)
    out, doc, start = [], 0, 0
    for _ in range(n_batches):
        windows = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            length = int(torch.randint(3, 12, (1,), generator=g))
            ids = torch.randint(1, 50, (length - 1,), generator=g).tolist()
            windows.append(Window(doc, 3 * doc, [0, *ids], True))
            doc += 1
        batch = collate(windows, PLAN)
        n = batch.n_analysed
        f = torch.randint(-1, 4, (n, d_sae), generator=g).float() * (torch.rand(n, d_sae, generator=g) < 0.4)
        x = torch.randn(n, D_IN, generator=g) * 3 + 1
        x_hat = x + 0.3 * torch.randn(n, D_IN, generator=g)
        n_pred = int(batch.predicts.sum())
        ce = {k: torch.rand(n_pred, generator=g) * s for k, s in (("ce_clean", 2.0), ("ce_sae", 3.0), ("ce_zero", 8.0))}
        kl = {k: torch.rand(n, generator=g) * s for k, s in (("kl_sae", 0.5), ("kl_zero", 5.0))}
        out.append(StepData(batch=batch, x=x, f=f, x_hat=x_hat, token_start=start, **ce, **kl))
        start += n
    return out


def _collectors(d_sae: int = D_SAE, k: int = K, cooc_method: str | None = None) -> list[StateCollector]:
    return [
        SparsityCollector(d_sae, rare_threshold=0.01, dense_threshold=0.3),
        ReconstructionCollector(D_IN),
        DownstreamCollector(),
        CooccurrenceCollector(d_sae, flush_tokens=40, method=cooc_method),  # shards end with rows still buffered
        TopExamplesCollector(d_sae, k=k, window=WINDOW),
    ]


def _feed(collectors, steps) -> None:
    for step in steps:
        for c in collectors:
            c.update(step)


def _assert_state_equal(got: StateCollector, want: StateCollector, exact: bool = False) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, (got.name, name)
        if a[name].dtype.is_floating_point and not exact and got.name != "examples":
            torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=0, msg=f"{got.name}/{name}")
        else:
            assert torch.equal(a[name], b[name]), f"{got.name}/{name}"


def _sharded(tmp_path, steps, make=_collectors, order=None):
    """Each shard into its own fresh collectors, saved; then loaded into fresh ones and merged."""
    paths = []
    for i, (lo, hi) in enumerate(CUTS):
        part = make()
        _feed(part, steps[lo:hi])
        paths.append(tmp_path / f"shard-{i:03d}")
        save_states(part, paths[-1])
    merged = make()
    for i in order or range(len(CUTS)):
        loaded = make()
        load_states(loaded, paths[i])
        for m, c in zip(merged, loaded, strict=True):
            m.merge(c)
    return merged, paths


def test_shards_saved_loaded_and_merged_equal_one_pass(tmp_path):
    steps = _stream(0)
    whole = _collectors()
    _feed(whole, steps)
    merged, _ = _sharded(tmp_path, steps)
    for m, w in zip(merged, whole, strict=True):
        _assert_state_equal(m, w)
    ex_m, ex_w = merged[-1], whole[-1]
    assert isinstance(ex_m, TopExamplesCollector) and isinstance(ex_w, TopExamplesCollector)
    assert ex_m.all_examples() == ex_w.all_examples()
    assert sum(len(e) for e in ex_w.all_examples()) > K  # something was kept
    for m, w in zip(merged[:3], whole[:3], strict=True):  # finished numbers
        got, want = m.compute(), w.compute()
        assert got.keys() == want.keys() and got
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=0, nan_ok=True), key
    cooc_m, cooc_w = merged[3], whole[3]
    assert isinstance(cooc_m, CooccurrenceCollector) and isinstance(cooc_w, CooccurrenceCollector)
    np.testing.assert_array_equal(cooc_m.finalize_counts(), cooc_w.finalize_counts())
    assert isinstance(cooc_m.fire, np.ndarray) and cooc_m.n_tokens == cooc_w.n_tokens == sum(s.x.shape[0] for s in steps)
    b = np.concatenate([(s.f != 0).numpy() for s in steps]).astype(np.int64)
    np.testing.assert_array_equal(cooc_m.counts, b.T @ b)


def test_device_side_cooccurrence_counts_are_synced_into_the_state(tmp_path):
    """The per-batch dense B^T B path (device-side counts; here on the CPU) saved per shard equals
    the buffered sparse path over the whole stream."""
    steps = _stream(3)
    whole = CooccurrenceCollector(D_SAE, flush_tokens=5, method="sparse")
    _feed([whole], steps)
    merged, _ = _sharded(tmp_path, steps, make=lambda: [CooccurrenceCollector(D_SAE, method="matmul")])
    np.testing.assert_array_equal(merged[0].finalize_counts(), whole.finalize_counts())
    assert merged[0].state_dict()["counts"].dtype == torch.int32


def test_topk_is_the_same_whatever_the_merge_order(tmp_path):
    steps = _stream(1)
    whole = _collectors()
    _feed(whole, steps)
    _, paths = _sharded(tmp_path, steps)
    merged = _collectors()
    merge_saved_states(merged, [paths[2], paths[0], paths[1]], _collectors)
    assert merged[-1].all_examples() == whole[-1].all_examples()  # type: ignore[attr-defined]
    for m, w in zip(merged[:-1], whole[:-1], strict=True):
        _assert_state_equal(m, w)  # integer sums exact, float sums within 1e-12 in any order


def test_topk_ties_across_shards_resolve_by_token_ascending():
    """Every firing has the same value: the kept examples are the k earliest tokens, also when
    the later shard is merged first."""
    steps = _stream(2)
    for s in steps:
        s.f = (s.f != 0).float() * 2.5
        s._sparse = None
    whole, early, late = (TopExamplesCollector(D_SAE, k=K, window=WINDOW) for _ in range(3))
    _feed([whole], steps)
    _feed([early], steps[:3])
    _feed([late], steps[3:])
    late.merge(early)
    assert late.all_examples() == whole.all_examples()
    tokens = torch.cat([s.token_index[:, None].expand(-1, D_SAE)[s.f != 0] for s in steps])
    feats = torch.cat([(s.f != 0).nonzero()[:, 1] for s in steps])
    for feat in range(D_SAE):
        want = sorted(tokens[feats == feat].tolist())[:K]
        assert whole.token[feat][: len(want)].tolist() == want
        assert [e["global_idx"] for e in late.examples(feat)] == want


def test_resume_by_loading_then_updating_is_bit_identical(tmp_path):
    """Load the first shard's state and keep feeding batches: the same float additions in the same
    order as one pass, so every state is bit-identical."""
    steps = _stream(4)
    whole = _collectors()
    _feed(whole, steps)
    first = _collectors()
    _feed(first, steps[:3])
    save_states(first, tmp_path / "resume")
    resumed = _collectors()
    load_states(resumed, tmp_path / "resume")
    assert isinstance(resumed[0].n_tokens, int) and isinstance(resumed[0].sum_l1, float)  # type: ignore[attr-defined]
    _feed(resumed, steps[3:])
    for r, w in zip(resumed, whole, strict=True):
        _assert_state_equal(r, w, exact=True)


def test_files_are_safetensors_and_json_without_pickle(tmp_path):
    steps = _stream(5)
    cs = _collectors()
    _feed(cs, steps)
    written = save_states(cs, tmp_path / "run.v1" / "state")
    tensor_path, json_path = state_paths(tmp_path / "run.v1" / "state")
    assert written == [tensor_path, json_path]
    assert tensor_path.name == "state.safetensors" and json_path.name == "state.json"
    assert sorted(p.name for p in tensor_path.parent.iterdir()) == ["state.json", "state.safetensors"]  # no temp files
    raw = tensor_path.read_bytes()
    assert raw[:2] != b"\x80\x04" and b"pickle" not in raw  # safetensors: a JSON header, then raw bytes
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])["examples/ctx"]["shape"] == [D_SAE, K, 2 * WINDOW + 1]
    with safe_open(str(tensor_path), framework="pt") as fh:
        keys = set(fh.keys())
        assert torch.equal(fh.get_tensor("sparsity/fire_count"), cs[0].fire_count)  # type: ignore[attr-defined]
        assert fh.get_tensor("cooccurrence/n_tokens").dtype == torch.int64
        assert fh.get_tensor("reconstruction/sum_dot").dtype == torch.float64
    assert keys == {f"{c.name}/{s}" for c in cs for s in c.state_names}
    spec = json.loads(json_path.read_text())
    by_name = {c["name"]: c for c in spec["collectors"]}
    assert [c["name"] for c in spec["collectors"]] == [c.name for c in cs]
    assert by_name["examples"]["class"] == "TopExamplesCollector"
    assert by_name["examples"]["config"] == {"d_sae": D_SAE, "k": K, "window": WINDOW}
    assert by_name["examples"]["states"]["value"] == {
        "dtype": "float32", "shape": [D_SAE, K], "reduce": "topk(key=value, tie=token)", "kind": "tensor"}
    assert by_name["sparsity"]["states"]["n_tokens"] == {"dtype": "int64", "shape": [], "reduce": "sum", "kind": "int"}
    assert by_name["sparsity"]["states"]["act_max"]["reduce"] == "max"
    assert by_name["cooccurrence"]["states"]["counts"]["kind"] == "ndarray"
    assert by_name["downstream"]["states"]["sum_kl_zero"]["kind"] == "float"
    # a second save replaces both files atomically
    cs[2].update(steps[0])
    save_states(cs, tmp_path / "run.v1" / "state")
    fresh = _collectors()
    load_states(fresh, tmp_path / "run.v1" / "state")
    assert fresh[2].n_pred == cs[2].n_pred  # type: ignore[attr-defined]


def test_mismatches_raise_value_errors_naming_them(tmp_path):
    steps = _stream(6)
    cs = _collectors()
    _feed(cs, steps[:2])
    path = tmp_path / "s"
    save_states(cs, path)
    with pytest.raises(ValueError, match=r"'examples'.*k.*\(3, 4\)"):
        load_states(_collectors(k=4), path)
    with pytest.raises(ValueError, match=r"'sparsity'.*d_sae.*\(9, 8\)"):
        load_states(_collectors(d_sae=8), path)
    with pytest.raises(ValueError, match=r"collectors differ"):
        load_states(_collectors()[:4], path)
    with pytest.raises(ValueError, match=r"unique"):
        save_states([SparsityCollector(3), SparsityCollector(3)], tmp_path / "dupe")
    with pytest.raises(ValueError, match=r"no collector states"):
        load_states(_collectors(), tmp_path / "absent")
    # a sidecar from another save is detected
    other = tmp_path / "other"
    save_states([DownstreamCollector()], other)
    state_paths(path)[1].write_bytes(state_paths(other)[1].read_bytes())
    with pytest.raises(ValueError, match=r"not from the same save"):
        load_states(_collectors(), path)
    # nothing was loaded by the failed calls
    fresh = _collectors()
    with pytest.raises(ValueError):
        load_states(fresh, path)
    assert fresh[0].n_tokens == 0  # type: ignore[attr-defined]

    sp = cs[0]
    good = sp.state_dict()
    with pytest.raises(ValueError, match=r"collector 'sparsity' \(SparsityCollector\).*no state 'l0_hist'"):
        SparsityCollector(D_SAE).load_state_dict({k: v for k, v in good.items() if k != "l0_hist"})
    with pytest.raises(ValueError, match=r"'sparsity'.*'extra'.*does not declare"):
        SparsityCollector(D_SAE).load_state_dict({**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'sparsity'.*state 'fire_count': dtype int32 differs from the declared int64"):
        SparsityCollector(D_SAE).load_state_dict({**good, "fire_count": good["fire_count"].int()})
    with pytest.raises(ValueError, match=r"state 'act_sum': shape \[10\] differs from the expected \[9\]"):
        SparsityCollector(D_SAE).load_state_dict({**good, "act_sum": torch.zeros(10, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"state 'n_tokens': dtype float64 differs"):
        SparsityCollector(D_SAE).load_state_dict({**good, "n_tokens": torch.tensor(1.0, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"another configuration"):
        TopExamplesCollector(D_SAE, k=K, window=WINDOW).merge(TopExamplesCollector(D_SAE, k=K, window=WINDOW + 1))
    with pytest.raises(ValueError, match=r"cannot merge a ReconstructionCollector"):
        sp.merge(cs[1])
    # a good state dict round-trips, copied (the source may change afterwards)
    again = SparsityCollector(D_SAE, rare_threshold=0.01, dense_threshold=0.3)
    again.load_state_dict(good)
    assert again.compute() == sp.compute()
    want = sp.fire_count.clone()
    good["fire_count"] += 100  # state_dict shares memory with the collector; load_state_dict copied
    assert torch.equal(again.fire_count, want) and not torch.equal(sp.fire_count, want)


class _Lowest(StateCollector):
    """A top-k group whose unfilled default (score 0, idx -1) would sort first by value: the
    two lowest (negative) scores, kept as the top-2 of -score."""

    name = "lowest"
    score: torch.Tensor
    idx: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        group = TopK(key="score", tie="idx")
        self.add_state("score", torch.zeros(1, 2), group)
        self.add_state("idx", torch.full((1, 2), -1), group)


def test_unfilled_topk_slots_sort_last_whatever_their_default():
    a, b = _Lowest(), _Lowest()
    a.score[0, 0], a.idx[0, 0] = -1.0, 4  # one filled slot each
    b.score[0, 0], b.idx[0, 0] = -2.0, 7
    a.merge(b)
    assert a.score.tolist() == [[-1.0, -2.0]] and a.idx.tolist() == [[4, 7]]
    c = _Lowest()
    c.merge(_Lowest())  # two empty collectors stay empty
    assert c.score.tolist() == [[0.0, 0.0]] and c.idx.tolist() == [[-1, -1]]


class _BatchLog(StateCollector):
    """A test collector for the reduces no production collector uses: per-batch L0 means
    concatenated in stream order, the smallest activation, the largest token count of a batch."""

    name = "batch_log"
    l0_means: torch.Tensor
    min_act: torch.Tensor
    biggest: int
    smallest_mean: float

    def __init__(self) -> None:
        super().__init__()
        self.add_state("l0_means", torch.zeros(0, 1, dtype=torch.float64), "cat")
        self.add_state("min_act", torch.full((D_SAE,), math.inf, dtype=torch.float64), "min")
        self.add_state("biggest", 0, "max")
        self.add_state("smallest_mean", math.inf, "min")

    def update(self, step: StepData) -> None:
        mean = float((step.f != 0).sum(1).double().mean())
        self.l0_means = torch.cat([self.l0_means, torch.tensor([[mean]], dtype=torch.float64)])
        self.min_act = torch.minimum(self.min_act, step.f.double().min(0).values)
        self.biggest = max(self.biggest, int(step.f.shape[0]))
        self.smallest_mean = min(self.smallest_mean, mean)


def test_cat_min_max_reduces_and_reset(tmp_path):
    steps = _stream(7)
    whole = _BatchLog()
    _feed([whole], steps)
    merged, paths = _sharded(tmp_path, steps, make=lambda: [_BatchLog()])
    _assert_state_equal(merged[0], whole, exact=True)
    assert merged[0].l0_means.shape == (len(steps), 1)  # type: ignore[attr-defined]
    spec = json.loads(state_paths(paths[0])[1].read_text())["collectors"][0]["states"]
    assert spec["l0_means"] == {"dtype": "float64", "shape": [2, 1], "reduce": "cat", "kind": "tensor"}
    whole.reset()
    assert whole.l0_means.shape == (0, 1) and whole.biggest == 0 and whole.smallest_mean == math.inf
    assert torch.equal(whole.min_act, torch.full((D_SAE,), math.inf, dtype=torch.float64))
    # reset gives the collectors' own state back its defaults too, buffers included
    cooc = CooccurrenceCollector(D_SAE, flush_tokens=10_000)
    _feed([cooc], steps)
    cooc.reset()
    assert cooc.n_tokens == 0 and not cooc.finalize_counts().any() and not cooc.fire.any()
    with pytest.raises(ValueError, match=r"unknown reduce 'mean'"):
        _BatchLog().add_state("x", 0, "mean")
    with pytest.raises(ValueError, match=r"Python scalar cannot be concatenated"):
        _BatchLog().add_state("x", 0, "cat")
    with pytest.raises(ValueError, match=r"already declared"):
        _BatchLog().add_state("biggest", 0, "max")
    with pytest.raises(ValueError, match=r"TopK state must be a tensor"):
        _BatchLog().add_state("x", torch.zeros(3), TopK("x"))
