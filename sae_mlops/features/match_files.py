"""Files of `sae-mlops match` (pure function of a `MatchResult`; no MLflow).

- ``matched_pairs.parquet``: :func:`sae_mlops.features.match.pairs_table` (one row per feature of
  each side: best decoder match and cosine, mutual, one-to-one partner, best activation match);
- ``assignment.parquet``: the one-to-one pairs (``feature_a``, ``feature_b``, ``cosine``), when computed;
- ``unmatched.parquet``: features whose best decoder cosine is below the lowest threshold
  (``side``, ``feature``, ``match``, ``cosine``, ``alive``);
- ``match_summary.json``: inputs, the token check and the metrics;
- ``plots/match_histograms.png``: histograms of the best-match cosine (and correlation) both ways;
- ``MATCH.md``: the headline for people.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sae_mlops.features.match import THRESHOLDS, MatchResult, pairs_table


def _plot(result: MatchResult, path: Path, label_a: str, label_b: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("decoder cosine", result.decoder)] + ([("activation correlation", result.activation)] if result.activation is not None else [])
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.2 * len(rows)), squeeze=False)
    finite = np.concatenate([v[np.isfinite(v)] for _, b in rows for v in (b.a_value, b.b_value)] or [np.zeros(1)])
    lo = min(0.0, float(np.floor(finite.min() * 10) / 10)) if finite.size else 0.0
    bins = np.linspace(lo, 1, int(round((1 - lo) * 40)) + 1)  # 0.025 wide
    for r, (what, best) in enumerate(rows):
        for c, (vals, title) in enumerate(((best.a_value, f"{label_a} -> {label_b}"), (best.b_value, f"{label_b} -> {label_a}"))):
            ax = axes[r][c]
            v = vals[np.isfinite(vals)]
            ax.hist(v, bins=bins, color="#4c72b0")
            for t in THRESHOLDS:
                ax.axvline(t, color="#c44e52", lw=1, ls="--")
            ax.set_title(f"best-match {what}: {title}", fontsize=9)
            ax.set_xlabel(what)
            ax.set_ylabel("features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_match(result: MatchResult, out_dir: Path, inputs: dict[str, Any], label_a: str = "A", label_b: str = "B") -> list[Path]:
    """Write the match outputs under ``out_dir``; return the files written."""
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    files = []
    pairs = pairs_table(result)
    p = out_dir / "matched_pairs.parquet"
    pairs.to_parquet(p, index=False)
    files.append(p)
    if result.assignment is not None:
        p = out_dir / "assignment.parquet"
        result.assignment.to_parquet(p, index=False)
        files.append(p)
    low = min(THRESHOLDS)
    unmatched = pairs.loc[~(pairs["cosine"] >= low), ["side", "feature", "match", "cosine", "alive"]].sort_values(["side", "cosine"])
    p = out_dir / "unmatched.parquet"
    unmatched.to_parquet(p, index=False)
    files.append(p)
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.metrics.items()}
    summary = {
        "inputs": inputs,
        "same_tokens": result.same_tokens,
        "same_tokens_reason": result.same_tokens_reason,
        "assignment": result.assignment is not None,
        "unmatched_threshold": low,
        "unmatched_a": unmatched.loc[unmatched.side == "a", "feature"].tolist(),
        "unmatched_b": unmatched.loc[unmatched.side == "b", "feature"].tolist(),
        "metrics": metrics,
        "seconds": result.seconds,
    }
    p = out_dir / "match_summary.json"
    p.write_text(json.dumps(summary, indent=2, default=str))
    files.append(p)
    p = out_dir / "plots" / "match_histograms.png"
    _plot(result, p, label_a, label_b)
    files.append(p)
    p = out_dir / "MATCH.md"
    p.write_text(_markdown(result, summary, label_a, label_b))
    files.append(p)
    return files


def _markdown(result: MatchResult, summary: dict[str, Any], label_a: str, label_b: str) -> str:
    m = result.metrics
    lines = [f"# Feature match: {label_a} vs {label_b}", ""]
    for side, label in (("a", label_a), ("b", label_b)):
        inp = summary["inputs"].get(side, {})
        lines.append(f"- {label}: `{inp.get('given', '')}` (SAE `{inp.get('sae', '')}`, d_sae {inp.get('d_sae', '')})")
    lines += ["", "| measure | A -> B | B -> A |", "|---|---|---|"]
    lines.append(f"| mean max decoder cosine | {m['match/mean_max_cos_a_to_b']:.4f} | {m['match/mean_max_cos_b_to_a']:.4f} |")
    if "match/random_mean_max_cos_a_to_b" in m:
        lines.append(f"| random directions, same d_in and widths (simulated) | {m['match/random_mean_max_cos_a_to_b']:.4f} | "
                     f"{m['match/random_mean_max_cos_b_to_a']:.4f} |")
    for t in THRESHOLDS:
        lines.append(f"| share with a match >= {t} (cosine) | {m[f'match/share_a_cos_ge_{t}']:.3f} | {m[f'match/share_b_cos_ge_{t}']:.3f} |")
    if result.activation is not None:
        lines.append(f"| mean max activation correlation | {m['match/mean_max_corr_a_to_b']:.4f} | {m['match/mean_max_corr_b_to_a']:.4f} |")
        for t in THRESHOLDS:
            lines.append(f"| share with a match >= {t} (correlation) | {m[f'match/share_a_corr_ge_{t}']:.3f} | {m[f'match/share_b_corr_ge_{t}']:.3f} |")
    lines.append("")
    lines.append(f"Mutual best pairs: {int(m['match/mutual_best_pairs'])}.")
    if result.assignment is not None:
        lines.append(f"One-to-one assignment (Hungarian): mean cosine {m['match/assignment_mean_cos']:.4f}.")
    else:
        lines.append("One-to-one assignment: not computed (d_sae above the assignment limit); best matches only.")
    lines.append(f"Activation correlation: {'computed' if result.activation is not None else 'not computed'} ({summary['same_tokens_reason']}).")
    for side in ("a", "b"):
        un = summary[f"unmatched_{side}"]
        shown = ", ".join(map(str, un[:50])) + (" ..." if len(un) > 50 else "")
        lines.append(f"Unmatched in {side.upper()} (best cosine < {summary['unmatched_threshold']}): {len(un)}{': ' + shown if un else ''}.")
    lines += ["", "![histograms](plots/match_histograms.png)", ""]
    return "\n".join(lines)
