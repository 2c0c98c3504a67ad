"""From documents to token batches: windowing, special-token masks, document positions.

Documents are tokenized without special tokens and cut into windows of ``context_size`` tokens
(``context_size - 1`` document tokens after a BOS when ``prepend_bos``). A window never spans two
documents, so every position reported to users is a position within its document.

Per batch we carry three masks over ``[batch, pos]``:

- ``valid``: a real token (not right padding);
- ``analysed``: valid and not special (T in ../shared/metrics.md): special ids are BOS, EOS, PAD
  and every other id the tokenizer declares special (SAELens ``get_special_token_ids`` plus
  ``tokenizer.all_special_ids``);
- ``predicts``: analysed at t and valid at t+1 (the next-token predictions that CE averages over).

Windows are bucketed by length inside a pool of batches to limit padding; bucketing is
deterministic, so a given corpus, budget and batch size always gives the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from sae_mlops.core.blocks import BlockLayout, window_key
from sae_mlops.errors import InputError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

TOKENIZE_CHUNK_DOCS = 256  # documents tokenized per call of the (Rust) fast tokenizer, at most
#: documents in the first call (then doubling): a shard that starts mid-corpus and ends after a few
#: documents does not tokenize 256 documents it will not use
FIRST_CHUNK_DOCS = 8
#: analysed tokens whose ids a plan keeps for the pass (:class:`PoolCache`; about 5 bytes a token):
#: beyond it the shards tokenize their documents again
KEEP_TOKENS = 1 << 25


def special_token_ids(tokenizer) -> list[int]:
    """BOS, EOS, PAD, SEP, ... plus every id the tokenizer declares special (sorted)."""
    from sae_lens.util import get_special_token_ids

    ids = set(get_special_token_ids(tokenizer))
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    return sorted(ids)


@dataclass
class Window:
    """One window of one document: ``tokens`` already include the BOS when one is prepended."""

    doc_index: int
    start: int  # document position of the first non-BOS token
    tokens: "list[int] | np.ndarray"  # a 1-D int32 array once a PoolCache keeps it (Pool.compact)
    has_bos: bool


@dataclass
class TokenBatch:
    """A right-padded batch of windows and its masks (all on CPU; the engine moves them)."""

    tokens: torch.Tensor  # [B, L] int64
    valid: torch.Tensor  # [B, L] bool
    analysed: torch.Tensor  # [B, L] bool
    predicts: torch.Tensor  # [B, L-1] bool: analysed at t and valid at t+1
    doc_index: torch.Tensor  # [B] int64
    doc_pos: torch.Tensor  # [B, L] int64: position within the document (-1 for BOS / padding)
    window_start: torch.Tensor | None = None  # [B] int64: document offset of each window's first token

    @property
    def starts(self) -> torch.Tensor:
        """[B] document offset of each window's first non-BOS token."""
        if self.window_start is not None:
            return self.window_start
        first = self.doc_pos.clamp(min=-1)
        masked = torch.where(first >= 0, first, torch.full_like(first, 2**62))
        return masked.min(dim=1).values

    @property
    def n_analysed(self) -> int:
        return int(self.analysed.sum())


@dataclass
class WindowPlan:
    context_size: int
    prepend_bos: bool
    bos_id: int | None
    pad_id: int
    special_ids: list[int]


def make_plan(tokenizer, context_size: int, prepend_bos: bool) -> WindowPlan:
    """Resolve BOS / PAD ids and special ids for windowing; InputError when BOS is needed but absent."""
    if context_size < 2:
        raise InputError(f"context size {context_size} is too small; use --context-size 2 or more.")
    bos_id = tokenizer.bos_token_id
    if bos_id is None and prepend_bos:
        bos_id = tokenizer.eos_token_id
    if prepend_bos and bos_id is None:
        raise InputError(
            "the tokenizer declares no BOS (or EOS) token but windows should start with one; "
            "pass --no-prepend-bos."
        )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return WindowPlan(context_size, prepend_bos, bos_id, int(pad_id), special_token_ids(tokenizer))


def iter_windows(texts: Sequence[str], tokenizer, plan: WindowPlan, start: tuple[int, int] = (0, 0)) -> Iterator[Window]:
    """Tokenize documents lazily (in chunks) and yield their windows in document order.

    start: (document index, token offset of a window within it): begin there, as if every earlier
    window had been yielded (a shard's first window, see :func:`plan_shards`)."""
    body = plan.context_size - (1 if plan.prepend_bos else 0)
    first_doc, first_offset = start
    chunk_start, size = first_doc, FIRST_CHUNK_DOCS
    while chunk_start < len(texts):
        chunk = list(texts[chunk_start : chunk_start + size])
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for offset, ids in enumerate(encoded):
            doc = chunk_start + offset
            for start_tok in range(first_offset if doc == first_doc else 0, len(ids), body):
                piece = ids[start_tok : start_tok + body]
                if plan.prepend_bos and plan.bos_id is not None:  # bos_id is set whenever prepend_bos is
                    yield Window(doc, start_tok, [plan.bos_id, *piece], True)
                else:
                    yield Window(doc, start_tok, list(piece), False)
        chunk_start, size = chunk_start + len(chunk), min(2 * size, TOKENIZE_CHUNK_DOCS)


def collate(windows: list[Window], plan: WindowPlan) -> TokenBatch:
    """Right-pad windows into tensors and build the masks. A window's tokens are a list or a
    1-D integer array (the ids a :class:`PoolCache` keeps)."""
    lengths = torch.tensor([len(w.tokens) for w in windows], dtype=torch.long)
    length = int(lengths.max())
    tokens = torch.full((len(windows), length), plan.pad_id, dtype=torch.long)
    for i, w in enumerate(windows):
        tokens[i, : len(w.tokens)] = torch.as_tensor(w.tokens)
    index = torch.arange(length)[None, :]
    valid = index < lengths[:, None]
    first = torch.tensor([1 if w.has_bos else 0 for w in windows], dtype=torch.long)[:, None]
    start = torch.tensor([w.start for w in windows], dtype=torch.long)[:, None]
    in_doc = valid & (index >= first)
    doc_pos = torch.where(in_doc, start + index - first, torch.full_like(tokens, -1))
    special = torch.isin(tokens, torch.tensor(plan.special_ids, dtype=torch.long))
    analysed = valid & ~special
    # A BOS we prepended is special even if the tokenizer does not list it.
    if windows[0].has_bos:
        analysed[:, 0] = False
    predicts = analysed[:, :-1] & valid[:, 1:]
    doc_index = torch.tensor([w.doc_index for w in windows], dtype=torch.long)
    return TokenBatch(tokens, valid, analysed, predicts, doc_index, doc_pos, start[:, 0].clone())


def count_analysed(window: Window, special: set[int], special_ids: torch.Tensor) -> int:
    """Tokens of the window that are analysed: not the prepended BOS, not special (no Python loop
    over tokens: ``list.count`` per special id when there are few, else ``torch.isin``). The window's
    tokens are a list here (windows as :func:`iter_windows` yields them)."""
    body = cast("list[int]", window.tokens[1:] if window.has_bos else window.tokens)
    if len(special) <= 8:
        return len(body) - sum(body.count(s) for s in special)
    return int((~torch.isin(torch.tensor(body, dtype=torch.long), special_ids)).sum())


def _truncate_to(window: Window, remaining: int, special: set[int]) -> Window:
    """Shorten a window so that it holds exactly ``remaining`` analysed tokens."""
    kept = 0
    for i, t in enumerate(window.tokens):
        if not (i == 0 and window.has_bos) and t not in special:
            kept += 1
            if kept == remaining:
                return Window(window.doc_index, window.start, window.tokens[: i + 1], window.has_bos)
    return window


@dataclass
class Pool:
    """Consecutive windows that are sorted by length and cut into batches together."""

    start: tuple[int, int]  # (document index, window offset) of its first window in stream order
    windows: list[Window]
    tokens: int  # analysed tokens in it
    counts: list[int] = field(default_factory=list)  # analysed tokens per window (stream order)

    def order(self) -> list[int]:
        """Window indices sorted by length (stable): the order its batches are cut in."""
        return sorted(range(len(self.windows)), key=lambda i: len(self.windows[i].tokens))

    def batch_tokens(self, batch_size: int) -> list[int]:
        """Analysed tokens of each of its batches, in batch order."""
        order = self.order()
        return [sum(self.counts[i] for i in order[b : b + batch_size]) for b in range(0, len(order), batch_size)]

    def compact(self) -> "Pool":
        """The same pool with every window's ids as an int32 array (about 4 bytes a token)."""
        import numpy as np

        windows = [Window(w.doc_index, w.start, np.asarray(w.tokens, dtype=np.int32), w.has_bos) for w in self.windows]
        return Pool(self.start, windows, self.tokens, self.counts)


def iter_pools(
    texts: Sequence[str],
    tokenizer,
    plan: WindowPlan,
    batch_size: int,
    max_tokens: int | None,
    pool_batches: int = 32,
    start: tuple[int, int] = (0, 0),
) -> Iterator[Pool]:
    """Windows grouped into pools of ``batch_size * pool_batches`` windows (the last pool smaller),
    windows without analysed tokens skipped, until the corpus ends or ``max_tokens`` analysed tokens
    are taken (the last window is cut so that they sum exactly to ``max_tokens``)."""
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} must be at least 1.")
    special = set(plan.special_ids)
    special_ids = torch.tensor(sorted(special), dtype=torch.long)
    taken = 0
    pool = Pool(start, [], 0)
    for window in iter_windows(texts, tokenizer, plan, start):
        n = count_analysed(window, special, special_ids)
        if n == 0:
            continue
        if not pool.windows:
            pool.start = (window.doc_index, window.start)
        if max_tokens is not None and taken + n >= max_tokens:
            pool.windows.append(_truncate_to(window, max_tokens - taken, special))
            pool.counts.append(max_tokens - taken)
            pool.tokens += max_tokens - taken
            break
        pool.windows.append(window)
        pool.counts.append(n)
        pool.tokens += n
        taken += n
        if len(pool.windows) >= batch_size * pool_batches:
            yield pool
            pool = Pool(start, [], 0)
    if pool.windows:
        yield pool


def pool_batches_of(pool: Pool, plan: WindowPlan, batch_size: int, skip: int = 0) -> Iterator[TokenBatch]:
    """A pool's batches: its windows sorted by length (stable), cut into ``batch_size`` windows;
    ``skip``: leave out its first batches (a shard that starts inside the pool)."""
    ordered = [pool.windows[i] for i in pool.order()]
    for i in range(skip * batch_size, len(ordered), batch_size):
        yield collate(ordered[i : i + batch_size], plan)


class PoolCache:
    """The pools a plan built, their windows' ids kept compact (:meth:`Pool.compact`), so that the
    pass does not tokenize the corpus a second time; looked up by a pool's first window."""

    def __init__(self) -> None:
        self.pools: list[Pool] = []
        self.index: dict[tuple[int, int], int] = {}
        self.tokens = 0

    def add(self, pool: Pool) -> None:
        self.index[pool.start] = len(self.pools)
        self.pools.append(pool.compact())
        self.tokens += sum(len(w.tokens) for w in pool.windows)

    def pools_from(self, start: tuple[int, int]) -> Iterator[Pool] | None:
        """The kept pools from the one that starts at ``start`` on; None when none starts there."""
        i = self.index.get(tuple(start))  # type: ignore[arg-type]
        return None if i is None else iter(self.pools[i:])


def iter_batches(
    texts: Sequence[str],
    tokenizer,
    plan: WindowPlan,
    batch_size: int,
    max_tokens: int | None,
    pool_batches: int = 32,
    shard: "ShardSpec | None" = None,
    cache: PoolCache | None = None,
) -> Iterator[TokenBatch]:
    """Yield batches until the corpus ends or ``max_tokens`` analysed tokens have been taken.

    The budget is exact: the last window is cut so that the analysed tokens sum to ``max_tokens``
    (unless the corpus is smaller). Windows are gathered in pools of ``pool_batches`` batches,
    sorted by length (stable) and cut into batches, to limit padding.

    shard: only that shard's batches (from :func:`plan_shards` with the same arguments): the very
    batches the whole stream has at those positions, since shards are whole batches. cache: the
    pools :func:`plan_shards` kept (their windows are not tokenized again).
    """
    if shard is None:
        for pool in iter_pools(texts, tokenizer, plan, batch_size, max_tokens, pool_batches):
            yield from pool_batches_of(pool, plan, batch_size)
        return
    start = (shard.start_doc, shard.start_offset)
    pools = cache.pools_from(start) if cache is not None else None
    if pools is None:
        pool_start = shard.token_start - shard.skip_tokens  # global index of the first pool's first token
        budget = None if max_tokens is None else max_tokens - pool_start
        pools = iter_pools(texts, tokenizer, plan, batch_size, budget, pool_batches, start)
    skip, left = shard.skip_batches, shard.batches
    for pool in pools:
        for batch in pool_batches_of(pool, plan, batch_size, skip):
            if left == 0:
                return
            yield batch
            left -= 1
        skip = 0
        if left == 0:
            return


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a pass: whole batches, so that a batch-global rule (BatchTopK) sees exactly
    the batches a single process sees. Token indices are global (stream order). A shard starts in
    the pool whose first window is (start_doc, start_offset), after that pool's first
    ``skip_batches`` batches (``skip_tokens`` analysed tokens), and takes ``batches`` batches."""

    index: int
    start_doc: int  # document of the first window of the pool it starts in
    start_offset: int  # token offset of that window within the document
    pools: int  # pools it touches
    batches: int
    token_start: int  # global index of its first analysed token
    tokens: int  # analysed tokens in it
    skip_batches: int = 0
    skip_tokens: int = 0
    windows: int = 0  # windows in it (0 in checkpoints written before this field)


def plan_shards(
    texts: Sequence[str],
    tokenizer,
    plan: WindowPlan,
    batch_size: int,
    max_tokens: int | None,
    shard_tokens: int,
    pool_batches: int = 32,
    facts: dict | None = None,
    cache: PoolCache | None = None,
) -> list[ShardSpec]:
    """The shards of :func:`plan_pass` (without the block layout)."""
    return plan_pass(texts, tokenizer, plan, batch_size, max_tokens, shard_tokens, pool_batches, facts, cache)[0]


def plan_pass(
    texts: Sequence[str],
    tokenizer,
    plan: WindowPlan,
    batch_size: int,
    max_tokens: int | None,
    shard_tokens: int,
    pool_batches: int = 32,
    facts: dict | None = None,
    cache: PoolCache | None = None,
) -> tuple[list[ShardSpec], BlockLayout]:
    """Cut the stream of :func:`iter_batches` into shards of about ``shard_tokens`` analysed tokens
    (whole batches: a shard ends with the first batch that brings it to ``shard_tokens``, so a
    shard may be smaller than a pool), and its windows into the blocks of
    :class:`~sae_mlops.core.blocks.BlockLayout` (the resampling unit of the intervals; they do not
    depend on ``shard_tokens``). Deterministic in (corpus, tokenizer, context size, BOS, batch size,
    budget, shard size): it tokenizes the corpus up to the budget once, without building batches.
    ``cache``: keep the pools there (up to :data:`KEEP_TOKENS` tokens; beyond, it is emptied and the
    pass tokenizes again). Unit of ``shard_tokens``: analysed tokens. facts: a dict that receives
    ``predicts`` (whether any window holds a next-token prediction: an analysed token followed by
    another token of its window; a corpus of one-token documents has none)."""
    shards: list[ShardSpec] = []
    current: dict | None = None
    token = 0
    keep = cache is not None
    keys: list[int] = []
    special = set(plan.special_ids)
    predicts = False
    for pool in iter_pools(texts, tokenizer, plan, batch_size, max_tokens, pool_batches):
        keys.extend(window_key(w.doc_index, w.start) for w in pool.windows)
        if not predicts:
            predicts = any(any(int(t) not in special for t in w.tokens[(1 if w.has_bos else 0):-1]) for w in pool.windows)
        if keep:
            assert cache is not None
            cache.add(pool)
            if cache.tokens > KEEP_TOKENS:
                cache.pools.clear()
                cache.index.clear()
                keep = False
        order = pool.order()
        per_batch = pool.batch_tokens(batch_size)
        pool_token = token
        touched = False
        for b, n in enumerate(per_batch):
            if current is None:
                current = {"start": pool.start, "pools": 0, "batches": 0, "token_start": token, "tokens": 0,
                           "skip_batches": b, "skip_tokens": token - pool_token, "windows": 0}
                touched = False
            if not touched:
                current["pools"] += 1
                touched = True
            current["batches"] += 1
            current["windows"] += len(order[b * batch_size : (b + 1) * batch_size])
            current["tokens"] += n
            token += n
            if current["tokens"] >= shard_tokens:
                shards.append(_spec(len(shards), current))
                current = None
    if current is not None:
        shards.append(_spec(len(shards), current))
    if facts is not None:
        facts["predicts"] = predicts
    return shards, BlockLayout.from_keys(keys)


def _spec(index: int, c: dict) -> ShardSpec:
    return ShardSpec(index, c["start"][0], c["start"][1], c["pools"], c["batches"], c["token_start"], c["tokens"],
                     c["skip_batches"], c["skip_tokens"], c["windows"])


def minimum_tokens(plan: WindowPlan, max_tokens: int | None) -> int:
    """The fewest analysable tokens worth an analysis: one full window of document tokens
    (``context_size``, minus one for the BOS), or the token budget when that is smaller."""
    window = plan.context_size - (1 if plan.prepend_bos else 0)
    return min(window, max_tokens) if max_tokens else window


def count_analysable(texts: Sequence[str], tokenizer, plan: WindowPlan, enough: int) -> int:
    """Analysable (non-special) tokens in `texts`, counted document by document until `enough` is
    reached (so a long corpus costs one small tokenizer call). Unit: tokens."""
    special = set(plan.special_ids)
    n, start, chunk = 0, 0, 8
    while start < len(texts) and n < enough:
        encoded = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False)["input_ids"]
        n += sum(sum(1 for t in ids if t not in special) for ids in encoded)
        start, chunk = start + chunk, TOKENIZE_CHUNK_DOCS
    return n


def check_enough_tokens(texts: Sequence[str], tokenizer, plan: WindowPlan, max_tokens: int | None, corpus: str) -> None:
    """`InputError` stating the numbers when the corpus holds fewer analysable tokens than
    `minimum_tokens` (metrics over a handful of tokens would look like results but mean nothing)."""
    needed = minimum_tokens(plan, max_tokens)
    n = count_analysable(texts, tokenizer, plan, needed)
    if n < needed:
        what = (
            f"the --max-tokens budget of {needed}"
            if max_tokens and needed == max_tokens < plan.context_size - (1 if plan.prepend_bos else 0)
            else f"one window of {needed} (context size {plan.context_size}{' with a BOS' if plan.prepend_bos else ''})"
        )
        raise InputError(
            f"the corpus '{corpus}' holds {n} analysable tokens, fewer than {what}; "
            "give a longer corpus or a smaller --context-size."
        )
