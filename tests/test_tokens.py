"""Windowing, masks and the token budget."""

from __future__ import annotations

import pytest
import torch

from core_fixtures import tiny_tokenizer
from sae_mlops.errors import InputError
from sae_mlops.core.tokens import iter_batches, iter_windows, make_plan, special_token_ids

TEXTS = ["alpha beta gamma delta " * 20, "short", "", "the quick brown fox " * 7]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_windows_cover_each_document_with_document_positions(tok):
    plan = make_plan(tok, context_size=16, prepend_bos=True)
    windows = list(iter_windows(TEXTS, tok, plan))
    for doc, text in enumerate(TEXTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        mine = [w for w in windows if w.doc_index == doc]
        rebuilt = [t for w in mine for t in w.tokens[1:]]
        assert rebuilt == ids
        assert all(w.tokens[0] == tok.bos_token_id and len(w.tokens) <= 16 for w in mine)
        assert [w.start for w in mine] == list(range(0, len(ids), 15))


def test_masks_exclude_specials_and_padding(tok):
    eos = tok.eos_token
    texts = [f"one two three {eos} four five six seven", "tiny"]
    plan = make_plan(tok, context_size=64, prepend_bos=True)
    (batch,) = list(iter_batches(texts, tok, plan, batch_size=8, max_tokens=None))
    specials = torch.tensor(special_token_ids(tok))
    assert not torch.isin(batch.tokens[batch.analysed], specials).any()
    assert not batch.analysed[:, 0].any()  # BOS
    assert (batch.analysed <= batch.valid).all()
    assert (batch.predicts == (batch.analysed[:, :-1] & batch.valid[:, 1:])).all()
    # positions within the document: BOS and padding -1, then 0, 1, 2 ...
    row = batch.doc_index.tolist().index(1)
    n = int(batch.valid[row].sum())
    assert batch.doc_pos[row, :n].tolist() == [-1, *range(n - 1)]
    assert (batch.doc_pos[row, n:] == -1).all()


@pytest.mark.parametrize("budget", [1, 17, 100, 10**9])
def test_budget_is_exact_or_whole_corpus(tok, budget):
    plan = make_plan(tok, context_size=16, prepend_bos=True)
    total = sum(b.n_analysed for b in iter_batches(TEXTS, tok, plan, 3, None))
    got = sum(b.n_analysed for b in iter_batches(TEXTS, tok, plan, 3, budget))
    assert got == min(budget, total)


@pytest.mark.parametrize("n_special", [2, 12])
def test_budget_counts_skip_many_special_ids(tok, n_special):
    """Ordinary ids declared special (few: list.count path; many: torch.isin path) are not counted."""
    from dataclasses import replace

    plan = make_plan(tok, context_size=16, prepend_bos=True)
    ids = sorted({t for text in TEXTS for t in tok(text, add_special_tokens=False)["input_ids"]})
    plan = replace(plan, special_ids=sorted(set(plan.special_ids) | set(ids[: n_special - 1])))
    total = sum(b.n_analysed for b in iter_batches(TEXTS, tok, plan, 3, None))
    expected = sum(1 for t in TEXTS for i in tok(t, add_special_tokens=False)["input_ids"] if i not in plan.special_ids)
    assert total == expected and total > 10
    got = sum(b.n_analysed for b in iter_batches(TEXTS, tok, plan, 3, total - 5))
    assert got == total - 5


def test_no_bos_windows(tok):
    plan = make_plan(tok, context_size=8, prepend_bos=False)
    batches = list(iter_batches(TEXTS, tok, plan, 2, None))
    assert all(b.tokens.shape[1] <= 8 for b in batches)
    assert sum(b.n_analysed for b in batches) == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)


def test_bad_sizes_are_input_errors(tok):
    with pytest.raises(InputError, match="context size"):
        make_plan(tok, context_size=1, prepend_bos=True)
    plan = make_plan(tok, 8, True)
    with pytest.raises(InputError, match="batch size"):
        list(iter_batches(TEXTS, tok, plan, 0, None))


def _same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("tokens", "valid", "analysed", "predicts", "doc_index", "doc_pos"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.mark.parametrize("budget", [None, 333, 10_000])
@pytest.mark.parametrize("shard_tokens", [1, 50, 120, 10**9])
@pytest.mark.parametrize("cached", [False, True])
def test_shards_are_the_whole_stream_cut_at_batch_boundaries(tok, budget, shard_tokens, cached):
    """Shards planned without building batches give, one after the other, exactly the batches of
    the whole stream (tokens, masks, document positions), with consecutive global token ranges;
    shards smaller than a pool start inside it; with the planned pools kept (``cached``) the
    shards are the same batches without tokenizing again."""
    from sae_mlops.core.tokens import PoolCache, plan_shards

    eos = tok.eos_token
    texts = [f"doc {i} " + " ".join(f"w{j}" for j in range(i * 7 % 53)) + (f" {eos} tail" if i % 3 == 0 else "")
             for i in range(60)]
    plan = make_plan(tok, context_size=12, prepend_bos=True)
    whole = list(iter_batches(texts, tok, plan, 3, budget, pool_batches=2))
    cache = PoolCache() if cached else None
    shards = plan_shards(texts, tok, plan, 3, budget, shard_tokens, pool_batches=2, cache=cache)
    assert len(shards) >= (2 if shard_tokens < 120 else 1)
    if shard_tokens == 1:  # one batch per shard: most shards start inside a pool
        assert len(shards) == len(whole) and sum(s.skip_batches > 0 for s in shards) >= len(whole) // 2 - 1
    if cached:
        assert cache is not None and len(cache.pools) == -(-len(whole) // 2)  # pools of 2 batches
        texts = ["unused"] * len(texts)  # the shards must not read the corpus again
    pieces, token = [], 0
    for spec in shards:
        assert spec.token_start == token
        got = list(iter_batches(texts, tok, plan, 3, budget, pool_batches=2, shard=spec, cache=cache))
        assert len(got) == spec.batches
        assert sum(b.n_analysed for b in got) == spec.tokens
        assert sum(int(b.tokens.shape[0]) for b in got) == spec.windows
        token += spec.tokens
        pieces += got
    _same_batches(pieces, whole)
    assert token == sum(b.n_analysed for b in whole)
    if budget is not None and budget < token + 1:
        assert token == budget
