"""Champion/challenger: may a new version take the gate's alias from the version holding it?

The new version (the *challenger*) takes the alias only when, on the gate's analysis kind,

- its analysis and the holder's (the *champion*) used the same token plan (same corpus digest, model,
  context size, BOS rule, batch size, budget and block layout: `sae_mlops.core.intervals.same_plan`),
  so that their per-block sums pair block by block;
- it is ``better`` (`sae_mlops.core.verdicts.judge`: paired block-bootstrap difference, Holm-adjusted
  p-value below ``alpha`` over the gate's metrics) on **every** metric of ``gate.better``;
- it is not ``worse`` on **any** metric of ``gate.guard``.

Different plans hold the version rather than fall back to unpaired intervals: the difference of two
analyses of different tokens (another corpus, budget or context) mixes the SAE change with the
plan change, which no interval separates, and the gate must not move an alias on such a difference.
Analyse both versions with one rule's options (the policy's, so the plan matches by construction).

Without a holder (the first version) the alias is taken when the bounds (``min``/``max``) hold. A
re-analysis of the holder itself keeps the alias. Without seed floors: a registry version is one
seed; train ``--seeds`` and compare with ``sae-mlops compare`` to see the seed noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sae_mlops.core.intervals import BlockSums, same_plan
from sae_mlops.core.verdicts import Verdict, judge, judged_metrics
from sae_mlops.metrics import format_value, lookup

PROMOTED = "promoted"
HELD = "held"
#: plan keys named when two analyses do not pair
PLAN_KEYS = ("corpus_digest", "model", "hook", "context_size", "prepend_bos", "batch_size", "max_tokens", "layout")


@dataclass
class Challenge:
    """The outcome: `decision` (promoted | held), one-sentence `reason`, the verdict `rows`, and the
    holder it was judged against (``reference``: ``v<N>``; None when there was none)."""

    decision: str
    reason: str
    reference: str | None = None
    rows: list[Verdict] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def markdown(self, alias: str, version: str) -> str:
        """The decision and the verdict table, for the version's description."""
        head = f"**Gate ({alias}): {self.decision}.** {self.reason}"
        return head if not self.rows else f"{head}\n\n{verdict_table(self.rows, version, self.reference or '?')}"


def plan_differences(a: BlockSums, b: BlockSums) -> list[str]:
    """``key: a vs b`` for each plan key on which the two analyses differ (and the block counts)."""
    out = [f"{k}: {a.plan.get(k)} vs {b.plan.get(k)}" for k in PLAN_KEYS if a.plan.get(k) != b.plan.get(k)]
    if a.n_blocks != b.n_blocks:
        out.append(f"blocks: {a.n_blocks} vs {b.n_blocks}")
    return out


def challenge(challenger: BlockSums, champion: BlockSums, champion_version: str, better: Sequence[str],
              guard: Sequence[str], alpha: float = 0.05, resamples: int = 9999) -> Challenge:
    """Judge `challenger` against `champion` (module docstring) and decide."""
    ref = f"v{champion_version}"
    if not same_plan(challenger, champion):
        diff = "; ".join(plan_differences(challenger, champion)) or "no block layout recorded"
        return Challenge(HELD, f"its analysis and {ref}'s used different token plans ({diff}), so they do not pair; "
                         "analyse both with the same options", ref)
    want = judged_metrics(better) if better else []
    keep = judged_metrics(guard) if guard else []
    names = list(dict.fromkeys([*want, *keep]))
    rows = judge((ref, champion), [("new", challenger)], metrics=names, alpha=alpha, resamples=resamples)
    by_metric = {r.metric: r for r in rows}
    missing = [n for n in names if n not in by_metric]
    not_better = [n for n in want if n in by_metric and by_metric[n].verdict != "better"]
    worse = [n for n in keep if n in by_metric and by_metric[n].verdict == "worse"]
    problems = []
    if missing:
        problems.append(f"{_labels(missing)} missing from an analysis")
    if not_better:
        problems.append(f"not significantly better on {_described(not_better, by_metric)}")
    if worse:
        problems.append(f"significantly worse on {_labels(worse)}")
    if problems:
        return Challenge(HELD, f"against {ref}: " + "; ".join(problems) + f" (Holm, alpha {alpha:g})", ref, rows)
    parts = [f"significantly better on {_labels(want)}"] if want else []
    if keep:
        parts.append(f"not worse on {_labels(keep)}")
    return Challenge(PROMOTED, f"against {ref}: " + ", ".join(parts) + f" (Holm, alpha {alpha:g})", ref, rows)


def _labels(names: Sequence[str]) -> str:
    return ", ".join(_label(n) for n in names)


def _label(name: str) -> str:
    m = lookup(name)
    return m.short or m.name if m is not None else name


def _described(names: Sequence[str], rows: dict[str, Verdict]) -> str:
    return ", ".join(f"{_label(n)} ({rows[n].verdict}, {rows[n].bound} bound)" if rows[n].verdict == "within noise"
                     else f"{_label(n)} ({rows[n].verdict})" for n in names)


def verdict_table(rows: Sequence[Verdict], version: str, reference: str) -> str:
    """Markdown: metric | reference | this version | difference [95 % interval] | p (Holm) | verdict."""
    lines = [f"| metric | {reference} | v{version} | difference [95 % interval] | p (Holm) | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        m = lookup(r.metric)
        fmt = m.fmt if m is not None else "{:.4g}"
        diff = f"{r.diff:+.3g} [{r.low:+.3g}, {r.high:+.3g}]"
        pair = "" if r.paired else " (unpaired)"
        lines.append(f"| {r.label} | {format_value(r.reference_value, fmt)} | {format_value(r.variant_value, fmt)} | "
                     f"{diff}{pair} | {r.p_holm:.3g} | {r.verdict} |")
    return "\n".join(lines)


def gate_section(text: str | None, section: str) -> str:
    """`text` (a version's description) with its gate section replaced by `section` (appended the
    first time; what the user wrote above it is kept)."""
    base = (text or "").split(MARKER, 1)[0].rstrip()
    return f"{base}\n\n{MARKER}\n{section}" if base else f"{MARKER}\n{section}"


MARKER = "<!-- sae-mlops gate -->"

__all__ = ["HELD", "MARKER", "PROMOTED", "Challenge", "challenge", "gate_section", "plan_differences", "verdict_table"]
