"""Position-0 features: features whose top examples sit mostly at the start of a document.

For feature ``i`` with ``n`` stored top examples at document positions ``p_1..p_n``:

    share_i = #{k : p_k <= max_position} / n

and the feature is reported when ``share_i >= min_share`` and ``n >= min_examples``. With
``max_position = 0`` these are the features that fire on the first analysed token (often an
attention-sink or "start of text" direction rather than anything about the text).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ["feature", "n_examples", "n_at_start", "share", "mean_position", "activation_frequency", "mean_activation"]


def position_shares(summaries: list[dict[str, Any]], max_position: int = 0) -> pd.DataFrame:
    """Per summary line: n_examples, n_at_start (examples at position <= max_position), share,
    mean position, activation_frequency and mean_activation."""
    rows = []
    for s in summaries:
        pos = np.array([e.get("position", -1) for e in s.get("top_examples", [])], dtype=np.int64)
        n = int(pos.size)
        at = int((pos <= max_position).sum()) if n else 0
        rows.append(
            {
                "feature": int(s["feature"]),
                "n_examples": n,
                "n_at_start": at,
                "share": at / n if n else 0.0,
                "mean_position": float(pos.mean()) if n else float("nan"),
                "activation_frequency": int(s.get("activation_frequency", 0)),
                "mean_activation": float(s.get("mean_activation", float("nan"))),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def position_zero_features(
    summaries: list[dict[str, Any]], max_position: int = 0, min_share: float = 0.5, min_examples: int = 1
) -> pd.DataFrame:
    """The features whose top examples are mostly (``share >= min_share``) at positions
    ``<= max_position``; largest share first, then most frequent."""
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must be a fraction in [0, 1], got {min_share}")
    t = position_shares(summaries, max_position)
    hits = t[(t["n_examples"] >= max(min_examples, 1)) & (t["share"] >= min_share)]
    return hits.sort_values(["share", "activation_frequency", "feature"], ascending=[False, False, True]).reset_index(drop=True)
