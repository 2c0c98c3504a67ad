"""The token-density heuristic: how concentrated a feature's trigger tokens are among its top examples.

For a feature with ``n`` stored top examples whose trigger tokens have counts
``c_(1) >= c_(2) >= c_(3) >= ...`` (tokens identified by id):

    top1_share = c_(1) / n
    top3_share = (c_(1) + c_(2) + c_(3)) / n

Label, first rule that applies:

- ``no_examples``: n = 0;
- ``interpretable``: top1_share >= t1 (default 0.9), one token explains the feature;
- ``medium``: top3_share >= t3 (default 0.9), a handful of tokens;
- ``polysemantic``: otherwise.

It says nothing about features that respond to context rather than to the token itself; read it
as a sorting aid, not a verdict.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import pandas as pd

LABELS = ("interpretable", "medium", "polysemantic", "no_examples")
COLUMNS = ["feature", "n_examples", "top1_token", "top1_share", "top3_share", "n_distinct_tokens", "label"]


def density_label(top1_share: float, top3_share: float, n_examples: int, t1: float = 0.9, t3: float = 0.9) -> str:
    """The label for one feature (rules in the module docstring)."""
    if n_examples == 0:
        return "no_examples"
    if top1_share >= t1:
        return "interpretable"
    if top3_share >= t3:
        return "medium"
    return "polysemantic"


def token_shares(tokens: Iterable[Any]) -> tuple[Any, float, float, int, int]:
    """(most common token, top1_share, top3_share, distinct tokens, n) for a list of trigger tokens."""
    counts = Counter(tokens)
    n = sum(counts.values())
    if n == 0:
        return None, 0.0, 0.0, 0, 0
    common = counts.most_common(3)
    return common[0][0], common[0][1] / n, sum(c for _, c in common) / n, len(counts), n


def token_density(summaries: list[dict[str, Any]], t1: float = 0.9, t3: float = 0.9) -> pd.DataFrame:
    """One row per summary line: n_examples, top1_token (its string), top1_share, top3_share,
    n_distinct_tokens and the label. Thresholds ``t1`` and ``t3`` are fractions in [0, 1]."""
    for name, t in (("t1", t1), ("t3", t3)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {t}")
    rows = []
    for s in summaries:
        ex = s.get("top_examples", [])
        keys = [e.get("token_id", e.get("token")) for e in ex]
        strings = {e.get("token_id", e.get("token")): e.get("token") for e in ex}
        top, s1, s3, distinct, n = token_shares(keys)
        rows.append(
            {
                "feature": int(s["feature"]),
                "n_examples": n,
                "top1_token": strings.get(top) if top is not None else None,
                "top1_share": s1,
                "top3_share": s3,
                "n_distinct_tokens": distinct,
                "label": density_label(s1, s3, n, t1, t3),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def label_counts(density: pd.DataFrame) -> pd.Series:
    """Features per label, every label listed (zeros included), in the order of ``LABELS``."""
    return density["label"].value_counts().reindex(list(LABELS), fill_value=0)
