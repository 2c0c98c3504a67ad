"""The metric registry is the one table of metrics: the quick analysis guide's metric table
(docs/guides/quick.md) defines exactly its names, every
consumer (CLI headline, SUMMARY, compare, service gate/tags) reads it, and formats behave."""

from __future__ import annotations

import re
from pathlib import Path

from sae_mlops.metrics import BY_NAME, BY_SHORT, METRICS, format_value, full_name, headline_line, lookup

ROOT = Path(__file__).resolve().parents[1]


def _guide_metric_names() -> set[str]:
    guide = (ROOT / "docs" / "guides" / "quick.md").read_text(encoding="utf-8")
    table = guide[guide.index("## Quick-analysis metrics"):]
    table = table[: table.index("\n\n", table.index("| name |"))]
    names = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_]+/[a-z0-9_]+)`", line.split("|")[1]))
    return names


def test_the_guides_metric_table_is_the_registry():
    # the synth/ group (ground truth on synthetic worlds) is documented in docs/guides/synth.md
    assert _guide_metric_names() == {n for n in BY_NAME if not n.startswith("synth/")}


def test_synth_guide_documents_the_synth_metrics():
    guide = (ROOT / "docs" / "guides" / "synth.md").read_text()
    documented = set(re.findall(r"`(synth/[a-z0-9_]+)`", guide))
    synth = {n for n in BY_NAME if n.startswith("synth/") and not n.startswith("synth/rho_")}
    assert synth <= documented, sorted(synth - documented)
    assert "synth/rho_<truth>_vs_<proxy>" in guide


def test_registry_rows_are_well_formed():
    assert len(BY_NAME) == len(METRICS)
    assert len(BY_SHORT) == len([m for m in METRICS if m.short])
    for m in METRICS:
        assert re.fullmatch(r"[a-z]+/[a-z0-9_]+", m.name), m.name
        assert m.label and m.fmt.startswith("{") and m.higher_is_better in (True, False, None)
        assert m.format(1.5) != "n/a"
    assert BY_NAME["downstream/loss_recovered"].higher_is_better is True
    assert BY_NAME["sparsity/l0_mean"].higher_is_better is False


def test_lookup_and_formats():
    assert lookup("l0").name == "sparsity/l0_mean" and lookup("l0_mean").name == "sparsity/l0_mean"
    assert full_name("cosine") == "recon/cosine" and full_name("not/a_metric") == "not/a_metric"
    assert format_value(None, "{:.2f}") == "n/a" and format_value(float("nan"), "{:.2f}") == "n/a"
    assert format_value("x", "{:.2f}") == "x"
    line = headline_line({"sparsity/l0_mean": 12.345, "downstream/loss_recovered": 0.91234})
    assert line == "L0 12.35 · loss recovered 0.9123"
    assert headline_line({"sparsity/l0_mean": 3.0, "recon/explained_variance": float("nan")}, bold=True) == "L0 **3.00**"


def test_consumers_read_the_registry():
    from sae_mlops.service import tags
    from sae_mlops.tracking.compare import METRICS as COMPARE_METRICS
    from sae_mlops.outputs.comparison import COLUMNS

    assert tags.metric_name("kl_score") == "downstream/kl_score" and tags.metric_name("l0_mean") == "sparsity/l0_mean"
    assert set(tags.HEADLINE_METRICS.values()) <= set(BY_NAME)
    assert all(BY_SHORT[short].name == name for short, name in COMPARE_METRICS.items())
    formats = {column: fmt for column, _, fmt in COLUMNS}
    assert formats["loss_recovered"] == BY_SHORT["loss_recovered"].fmt
