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
from dataclasses import dataclass

import torch

from sae_mlops.core.blocks import BlockLayout, window_key
from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

TOKENIZE_CHUNK_DOCS = 256  # documents tokenized per call of the (Rust) fast tokenizer


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
    tokens: list[int]
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
    for chunk_start in range(first_doc, len(texts), TOKENIZE_CHUNK_DOCS):
        chunk = list(texts[chunk_start : chunk_start + TOKENIZE_CHUNK_DOCS])
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for offset, ids in enumerate(encoded):
            doc = chunk_start + offset
            for start_tok in range(first_offset if doc == first_doc else 0, len(ids), body):
                piece = ids[start_tok : start_tok + body]
                if plan.prepend_bos and plan.bos_id is not None:  # bos_id is set whenever prepend_bos is
                    yield Window(doc, start_tok, [plan.bos_id, *piece], True)
                else:
                    yield Window(doc, start_tok, list(piece), False)


def collate(windows: list[Window], plan: WindowPlan) -> TokenBatch:
    """Right-pad windows into tensors and build the masks (one tensor construction per field)."""
    lengths = torch.tensor([len(w.tokens) for w in windows], dtype=torch.long)
    length = int(lengths.max())
    tokens = torch.tensor([w.tokens + [plan.pad_id] * (length - len(w.tokens)) for w in windows], dtype=torch.long)
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
    over tokens: ``list.count`` per special id when there are few, else ``torch.isin``)."""
    body = window.tokens[1:] if window.has_bos else window.tokens
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
            pool.tokens += max_tokens - taken
            break
        pool.windows.append(window)
        pool.tokens += n
        taken += n
        if len(pool.windows) >= batch_size * pool_batches:
            yield pool
            pool = Pool(start, [], 0)
    if pool.windows:
        yield pool


def pool_batches_of(pool: Pool, plan: WindowPlan, batch_size: int) -> Iterator[TokenBatch]:
    """A pool's batches: its windows sorted by length (stable), cut into ``batch_size`` windows."""
    ordered = sorted(pool.windows, key=lambda w: len(w.tokens))
    for i in range(0, len(ordered), batch_size):
        yield collate(ordered[i : i + batch_size], plan)


def iter_batches(
    texts: Sequence[str],
    tokenizer,
    plan: WindowPlan,
    batch_size: int,
    max_tokens: int | None,
    pool_batches: int = 32,
    shard: "ShardSpec | None" = None,
) -> Iterator[TokenBatch]:
    """Yield batches until the corpus ends or ``max_tokens`` analysed tokens have been taken.

    The budget is exact: the last window is cut so that the analysed tokens sum to ``max_tokens``
    (unless the corpus is smaller). Windows are gathered in pools of ``pool_batches`` batches,
    sorted by length (stable) and cut into batches, to limit padding.

    shard: only that shard's batches (from :func:`plan_shards` with the same arguments): the very
    batches the whole stream has at those positions, since shards are whole pools.
    """
    start, pools, budget = (0, 0), None, max_tokens
    if shard is not None:
        start, pools = (shard.start_doc, shard.start_offset), shard.pools
        budget = None if max_tokens is None else max_tokens - shard.token_start
    for i, pool in enumerate(iter_pools(texts, tokenizer, plan, batch_size, budget, pool_batches, start)):
        if pools is not None and i >= pools:
            return
        yield from pool_batches_of(pool, plan, batch_size)


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a pass: whole pools of whole batches, so that a batch-global rule (BatchTopK)
    sees exactly the batches a single process sees. Token indices are global (stream order)."""

    index: int
    start_doc: int  # document of its first window
    start_offset: int  # token offset of that window within the document
    pools: int
    batches: int
    token_start: int  # global index of its first analysed token
    tokens: int  # analysed tokens in it


def plan_shards(
    texts: Sequence[str],
    tokenizer,
    plan: WindowPlan,
    batch_size: int,
    max_tokens: int | None,
    shard_tokens: int,
    pool_batches: int = 32,
    facts: dict | None = None,
) -> list[ShardSpec]:
    """The shards of :func:`plan_pass` (without the block layout)."""
    return plan_pass(texts, tokenizer, plan, batch_size, max_tokens, shard_tokens, pool_batches, facts)[0]


def plan_pass(
    texts: Sequence[str],
    tokenizer,
    plan: WindowPlan,
    batch_size: int,
    max_tokens: int | None,
    shard_tokens: int,
    pool_batches: int = 32,
    facts: dict | None = None,
) -> tuple[list[ShardSpec], BlockLayout]:
    """Cut the stream of :func:`iter_batches` into shards of about ``shard_tokens`` analysed tokens
    (whole pools: a shard ends with the first pool that reaches ``shard_tokens``), and its windows
    into the blocks of :class:`~sae_mlops.core.blocks.BlockLayout` (the resampling unit of the
    intervals). Deterministic in (corpus, tokenizer, context size, BOS, batch size, budget, shard
    size): it tokenizes the corpus up to the budget once, without building batches. Unit of
    ``shard_tokens``: analysed tokens. The blocks do not depend on ``shard_tokens``.
    facts: a dict that receives ``predicts`` (whether any window holds a next-token prediction: an
    analysed token followed by another token of its window; a corpus of one-token documents has none)."""
    shards: list[ShardSpec] = []
    current: dict | None = None
    token = 0
    keys: list[int] = []
    special = set(plan.special_ids)
    predicts = False
    for pool in iter_pools(texts, tokenizer, plan, batch_size, max_tokens, pool_batches):
        keys.extend(window_key(w.doc_index, w.start) for w in pool.windows)
        if not predicts:
            predicts = any(any(t not in special for t in w.tokens[(1 if w.has_bos else 0):-1]) for w in pool.windows)
        if current is None:
            current = {"start": pool.start, "pools": 0, "batches": 0, "token_start": token, "tokens": 0}
        current["pools"] += 1
        current["batches"] += -(-len(pool.windows) // batch_size)
        current["tokens"] += pool.tokens
        token += pool.tokens
        if current["tokens"] >= shard_tokens:
            shards.append(_spec(len(shards), current))
            current = None
    if current is not None:
        shards.append(_spec(len(shards), current))
    if facts is not None:
        facts["predicts"] = predicts
    return shards, BlockLayout.from_keys(keys)


def _spec(index: int, c: dict) -> ShardSpec:
    return ShardSpec(index, c["start"][0], c["start"][1], c["pools"], c["batches"], c["token_start"], c["tokens"])


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
