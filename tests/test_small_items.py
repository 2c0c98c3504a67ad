"""Smaller cases of the second hardening pass, each on a real demo run:
- ``--neighbours`` above d_sae - 1 is logged as the number written (d_sae - 1), with a warning;
- a budget larger than the corpus is said in the log (all of the corpus is analysed)."""

from __future__ import annotations

import logging

from sae_mlops.config import AnalysisConfig, FullOptions
from sae_mlops.demo import demo_sae_path, ensure_demo_assets
from sae_mlops.workflows import run_full_and_log


def test_neighbours_clamp_and_budget_beyond_the_corpus(tmp_path, caplog):
    ensure_demo_assets()
    caplog.set_level(logging.INFO, logger="sae_mlops")
    import json

    from sae_mlops.demo import demo_corpus_path

    texts = json.loads(demo_corpus_path().read_text(encoding="utf-8"))[:40]  # a small corpus
    (tmp_path / "small.json").write_text(json.dumps(texts))
    cfg = AnalysisConfig(sae=str(demo_sae_path("standard")), model="demo", corpus=str(tmp_path / "small.json"),
                         max_tokens=10**8, batch_size=8, progress=False)
    outcome = run_full_and_log(cfg, tmp_path / "full", opts=FullOptions(neighbours=1000), track=False)
    assert outcome.result.params["full_neighbours"] == 511  # d_sae 512
    assert any("--neighbours 1000 exceeds the 511 other features" in w for w in outcome.warnings)
    analysed = int(outcome.result.metrics["tokens/analysed"])
    assert any(f"holds {analysed:,} analysable tokens, fewer than the budget --max-tokens 100,000,000" in r.getMessage()
               for r in caplog.records)
