"""Per-feature tables: the feature-summary table, top features, token counts among a feature's top
examples, highlighted contexts and positions.

Definitions (``n`` = number of analysed tokens, ``f_i`` = activation of feature ``i``):

- ``activation_frequency``: count of tokens with ``f_i > 0``; ``firing_fraction`` = that / ``n``;
- ``mean_activation`` = mean of ``f_i`` over the tokens where ``f_i > 0``;
- token counts and positions are over the feature's stored top-k examples, not the whole corpus.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from sae_mlops.interp.data import AnalysisData

MARK_OPEN, MARK_CLOSE = "[[", "]]"

TABLE_COLUMNS = ["feature", "activation_frequency", "firing_fraction", "mean_activation", "max_activation", "n_examples", "top_token"]


def feature_table(data: AnalysisData) -> pd.DataFrame:
    """One row per feature that fired: the summary numbers, the number of stored examples and the
    most common trigger token among them (``top_token``)."""
    rows = []
    for s in data.summaries:
        ex = s.get("top_examples", [])
        tokens = pd.Series([e.get("token", "") for e in ex], dtype=object)
        rows.append(
            {
                "feature": int(s["feature"]),
                "activation_frequency": int(s.get("activation_frequency", 0)),
                "firing_fraction": float(s.get("firing_fraction", np.nan)),
                "mean_activation": float(s.get("mean_activation", np.nan)),
                "max_activation": float(s.get("max_activation", np.nan)),
                "n_examples": len(ex),
                "top_token": tokens.value_counts().index[0] if len(tokens) else None,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def describe_features(table: pd.DataFrame) -> pd.DataFrame:
    """``DataFrame.describe`` of the numeric columns (count, mean, std, min, quartiles, max)."""
    return table[["activation_frequency", "firing_fraction", "mean_activation", "max_activation", "n_examples"]].describe()


def top_features(table: pd.DataFrame, by: Literal["mean_activation", "activation_frequency", "max_activation"] = "mean_activation", n: int = 10) -> pd.DataFrame:
    """The ``n`` features with the largest ``by`` (ties broken by feature index)."""
    if by not in table.columns:
        raise ValueError(f"unknown column {by!r}; use one of {list(table.columns)}")
    return table.sort_values([by, "feature"], ascending=[False, True], kind="stable").head(n).reset_index(drop=True)


def token_counts(data: AnalysisData, feature: int) -> pd.DataFrame:
    """Trigger tokens among the feature's top examples: token, count, share = count / n_examples,
    mean and max activation on that token; most frequent first."""
    ex = data.examples(feature)
    cols = ["token_id", "token", "count", "share", "mean_activation", "max_activation"]
    if ex.empty:
        return pd.DataFrame(columns=cols)
    g = ex.groupby(["token_id", "token"], dropna=False)["activation"].agg(["count", "mean", "max"]).reset_index()
    g = g.rename(columns={"mean": "mean_activation", "max": "max_activation"})
    g["share"] = g["count"] / len(ex)
    return g.sort_values(["count", "max_activation"], ascending=False, kind="stable").reset_index(drop=True)[cols]


def split_context(context: str) -> tuple[str, str, str]:
    """(before, marked token, after) of a context string whose token is marked ``[[like this]]``."""
    start = context.find(MARK_OPEN)
    end = context.find(MARK_CLOSE, start + len(MARK_OPEN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return context, "", ""
    return context[:start], context[start + len(MARK_OPEN) : end], context[end + len(MARK_CLOSE) :]


def _visible(s: str) -> str:
    return s.replace("\r", "\\r").replace("\n", "\u21b5")


def highlight_context(context: str, fmt: Literal["html", "markdown", "text"] = "html") -> str:
    """A context with its activating token emphasised: ``<mark>`` in HTML, bold in markdown,
    ``[[...]]`` kept in text. Newlines are shown as the return symbol."""
    before, token, after = (_visible(p) for p in split_context(context))
    if fmt == "html":
        return (
            f'<span style="white-space:pre-wrap;font-family:monospace">{html.escape(before)}'
            f'<mark style="background:#ffd54f;font-weight:bold">{html.escape(token)}</mark>{html.escape(after)}</span>'
        )
    if fmt == "markdown":

        def esc(s: str) -> str:
            for ch in "\\`*_|[]<>#":
                s = s.replace(ch, "\\" + ch)
            return s

        return f"{esc(before)}**{esc(token) or ' '}**{esc(after)}"
    if fmt == "text":
        return f"{before}{MARK_OPEN}{token}{MARK_CLOSE}{after}"
    raise ValueError(f"unknown format {fmt!r}; use html, markdown or text")


def highlighted_contexts(data: AnalysisData, feature: int, n: int = 10, fmt: Literal["html", "markdown", "text"] = "html") -> str:
    """The feature's ``n`` strongest examples as an HTML table or a markdown list (activation,
    document, position, context with the token highlighted)."""
    ex = data.examples(feature).head(n)
    if fmt == "html":
        rows = "".join(
            f"<tr><td>{r.activation:.3f}</td><td>{int(r.text_idx)}</td><td>{int(r.position)}</td>"
            f'<td style="text-align:left">{highlight_context(r.context, "html")}</td></tr>'
            for r in ex.itertuples()
        )
        head = "<tr><th>activation</th><th>doc</th><th>pos</th><th>context</th></tr>"
        caption = f"<caption>Feature {feature}: top {len(ex)} examples</caption>"
        return f"<table>{caption}{head}{rows}</table>" if len(ex) else f"<p>Feature {feature} has no stored examples.</p>"
    lines = [f"- {r.activation:.3f} (doc {int(r.text_idx)}, pos {int(r.position)}): {highlight_context(r.context, fmt)}" for r in ex.itertuples()]
    return "\n".join(lines) if lines else f"Feature {feature} has no stored examples."


def position_histogram(data: AnalysisData, feature: int, bins: int | Sequence[float] = 20) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.histogram`` of the document positions of the feature's top examples: (counts, edges)."""
    pos = data.examples(feature)["position"].to_numpy(dtype=np.float64)
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1)
    return np.histogram(pos, bins=bins)


def pick_features(table: pd.DataFrame, density: pd.DataFrame | None = None, n: int = 4) -> list[int]:
    """A few features worth a look when none were named: the most frequent feature of each
    token-density label (interpretable, medium, polysemantic), then the strongest by mean
    activation and the most frequent overall, without repeats, at most ``n``."""
    picked: list[int] = []

    def add(f) -> None:
        if f is not None and int(f) not in picked and len(picked) < n:
            picked.append(int(f))

    ranked = table[table["n_examples"] > 0].sort_values(["activation_frequency", "feature"], ascending=[False, True])
    if density is not None and not density.empty:
        labels = density.set_index("feature")["label"]
        for label in ("interpretable", "medium", "polysemantic"):
            hits = ranked[ranked["feature"].map(labels) == label]
            add(hits["feature"].iloc[0] if len(hits) else None)
    for f in top_features(table[table["n_examples"] > 0], "mean_activation", n)["feature"]:
        add(f)
    for f in ranked["feature"]:
        add(f)
    return picked


def logit_lens_tokens(data: AnalysisData, feature: int, n: int = 10) -> pd.DataFrame:
    """Tokens the feature's decoder direction promotes (side ``top``) and suppresses (``bottom``)
    through the unembedding, as the full analysis recorded them (empty when it had no logit lens)."""
    if data.logit_lens is None:
        return pd.DataFrame(columns=["side", "rank", "token", "logit"])
    t = data.logit_lens
    t = t[(t["feature"] == feature) & (t["rank"] < n)]
    return t[["side", "rank", "token", "logit"]].reset_index(drop=True)
