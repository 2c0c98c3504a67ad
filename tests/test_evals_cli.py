"""`sae-mlops probe` and `sae-mlops evals` end to end on the demo SAEs with a sqlite MLflow store: the
three SAEs of one hook share one model pass through the activation cache, every eval metric is in the
registry and logged to one run, and the suite's autointerp runs against the local OpenAI-compatible
stub (tests/openai_stub.py) in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from openai_stub import StubServer
from typer.testing import CliRunner

from sae_mlops.cli import app
from sae_mlops.metrics import lookup

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("standard", "batchtopk", "saelens")


def _datasets(tmp: Path) -> str:
    """A binary JSONL task (doctest or not) and a 3-class CSV task (topic keywords) from the demo corpus."""
    from sae_mlops.evals.datasets import demo_datasets

    doctest, _, topic = demo_datasets(per_class=24)
    (tmp / "doctest.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(doctest.texts, doctest.labels, strict=True)))
    keep = [(t, y) for t, y in zip(topic.texts, topic.labels, strict=True) if y in ("files", "numbers", "network")][:60]
    pd.DataFrame(keep, columns=["body", "topic"]).to_csv(tmp / "topic.csv", index=False)
    return f"doc={tmp / 'doctest.jsonl'},topic={tmp / 'topic.csv'}"


def _logged_evals(client: MlflowClient, run_id: str) -> dict[str, float]:
    return {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.split("/")[0] in ("probe", "absorption", "autointerp")}


def test_probe_cli_on_the_three_demo_saes_runs_the_model_once(tmp_path: Path, mlflow_store: str) -> None:
    from sae_mlops.demo import demo_sae_path

    spec = _datasets(tmp_path)
    runner = CliRunner()
    cache = tmp_path / "cache"
    # the CSV names its columns body/topic: one --text-column/--label-column applies to every dataset, so
    # the CSV task fails with one sentence naming the column and the fix (exit 2, no traceback)
    r = runner.invoke(app, ["probe", "--sae", str(demo_sae_path("standard")), "--datasets", spec, "--device", "cpu",
                            "--cache-dir", str(cache), "--no-track"])
    assert r.exit_code == 2 and "no column 'text'" in r.output and "--text-column" in r.output and "Traceback" not in r.output
    pd.read_csv(tmp_path / "topic.csv").rename(columns={"body": "text", "topic": "label"}).to_csv(tmp_path / "topic.csv", index=False)
    outputs = {}
    for kind in KINDS:
        r = runner.invoke(app, ["probe", "--sae", str(demo_sae_path(kind)), "--datasets", spec, "--ks", "1,2,5", "--context-size", "32",
                                "--device", "cpu", "--cache-dir", str(cache), "--out", str(tmp_path / kind)])
        assert r.exit_code == 0, r.output
        outputs[kind] = r.output
    assert "0 hit(s), 2 miss(es)" in outputs["standard"]  # the model ran for the two datasets once...
    assert "2 hit(s), 0 miss(es)" in outputs["batchtopk"] and "2 hit(s), 0 miss(es)" in outputs["saelens"]  # ...and never again
    assert len(list(cache.glob("*.safetensors"))) == 2
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`sae_mlops.kind` = 'probe'")
    assert len(runs) == 3
    accs = {}
    for run in runs:
        m = _logged_evals(client, run.info.run_id)
        for name in m:
            assert lookup(name) is not None or name.endswith(("_ci_low", "_ci_high")), name
        assert {"probe/sae_acc_k1", "probe/sae_acc_k1_ci_low", "probe/dense_acc", "probe/doc/sae_acc_k5", "probe/topic/raw_auc_k2"} <= set(m)
        assert m["probe/datasets"] == 2 and m["probe/tasks"] == 4  # 1 binary + 3 one-vs-rest
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "evals/probe")}
        assert "evals/probe/probe_accuracy_vs_k.png" in arts
        assert run.data.tags["sae_mlops.sae_hash"] and run.data.tags["sae_mlops.evals"] == "probe"
        accs[run.data.params["sae"]] = m["probe/sae_acc_k5"]
        # the logged figure is the mean of the per-task rows written to disk
        table = pd.read_parquet(_out_of(tmp_path, run) / "probe" / "probe_results.parquet")
        per_ds = table[(table["representation"] == "sae") & (table["k"] == 5)].groupby("dataset")["accuracy"].mean()
        assert m["probe/sae_acc_k5"] == pytest.approx(per_ds.mean())
    assert len(set(accs.values())) > 1  # the three SAEs differ


def _out_of(tmp: Path, run) -> Path:
    sae = Path(run.data.params["sae"])
    return tmp / {"sae_standard": "standard", "sae_batchtopk": "batchtopk", "sae_saelens": "saelens"}[sae.name]


def test_evals_suite_logs_every_eval_to_one_run(tmp_path: Path, mlflow_store: str) -> None:
    from sae_mlops.demo import demo_sae_path

    spec = _datasets(tmp_path)
    pd.read_csv(tmp_path / "topic.csv").rename(columns={"body": "text", "topic": "label"}).to_csv(tmp_path / "topic.csv", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "sk-test"}
    with StubServer() as server:
        proc = subprocess.run(
            [sys.executable, "-m", "sae_mlops.cli", "evals", "--sae", str(demo_sae_path("standard")), "--suite",
             "core,probe,absorption,autointerp", "--max-tokens", "1500", "--datasets", spec, "--ks", "1,5", "--context-size", "32",
             "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--llm-base-url", server.url, "--llm-model", "stub",
             "--llm-rpm", "0", "--autointerp-features", "6", "--out", str(tmp_path / "ev"), "-q"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "")
    assert len(runs) == 1  # the core (full) analysis's run holds every eval
    run = runs[0]
    assert run.data.tags["sae_mlops.kind"] == "full" and run.data.tags["sae_mlops.evals"] == "core,probe,absorption,autointerp"
    m = run.data.metrics
    assert "sparsity/l0_mean" in m and "probe/sae_acc_k1" in m and "absorption/probe_accuracy" in m
    # the demo model does not encode first letters: the eval says so and logs no absorption figure
    assert "absorption/full_absorption_rate" not in m and "do not encode first letters" in proc.stdout
    assert m["autointerp/features_labelled"] == 6
    assert m["autointerp/features_scored"] + m["autointerp/features_not_scored"] == 6
    if m["autointerp/features_scored"] >= 1:
        assert m["autointerp/detection_score"] == pytest.approx(0.5)  # the stub calls every snippet active
    labels = [json.loads(x) for x in (tmp_path / "ev" / "analysis" / "labels" / "labels.jsonl").read_text().splitlines()]
    for rec in labels:  # a scored feature saw 5 activating and 5 non-activating snippets, never fewer
        assert ("detection_truth" in rec and sorted(rec["detection_truth"]) == [0] * 5 + [1] * 5) or rec.get("detection_skipped")
    for name in m:
        if name.split("/")[0] in ("probe", "absorption", "autointerp"):
            assert lookup(name) is not None or name.endswith(("_ci_low", "_ci_high")), name
    md = (tmp_path / "ev" / "EVALS.md").read_text()
    assert "SAE top-1 accuracy" in md and "dense baseline accuracy" in md and "detection score" in md
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "evals")}
    assert {"evals/EVALS.md", "evals/probe", "evals/absorption"} <= arts


def test_compare_takes_eval_metrics_from_the_saes_probe_runs(tmp_path: Path, mlflow_store: str) -> None:
    """`sae-mlops probe` logs to its own run: compare shows its metrics in the row (and the verdicts) of
    the analysis of the same SAE, whether the probe ran before the analysis (no link, same SAE hash and
    hook) or after it (linked by ``sae_mlops.analysis_run_id``); an SAE never probed has no eval cells,
    and a probe run in another experiment is not taken."""
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.tracking.compare import compare_and_log

    spec = _datasets(tmp_path)
    pd.read_csv(tmp_path / "topic.csv").rename(columns={"body": "text", "topic": "label"}).to_csv(tmp_path / "topic.csv", index=False)
    runner = CliRunner()

    def probe(kind: str, experiment: str) -> str:
        r = runner.invoke(app, ["probe", "--sae", str(demo_sae_path(kind)), "--datasets", spec, "--ks", "1,5", "--context-size", "32",
                                "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--experiment", experiment,
                                "--out", str(tmp_path / f"probe-{kind}-{experiment}"), "--quiet"])
        assert r.exit_code == 0, r.output
        return r.output.split("Logged to MLflow run ")[1].split()[0]

    before = probe("standard", "evx")  # before any analysis: no link
    probe("saelens", "elsewhere")  # another experiment: not compared
    analyses = {}
    for kind in KINDS:
        r = runner.invoke(app, ["quick", "--sae", str(demo_sae_path(kind)), "--max-tokens", "1500", "--device", "cpu",
                                "--experiment", "evx", "--out", str(tmp_path / f"quick-{kind}"), "--quiet"])
        assert r.exit_code == 0, r.output
    client = MlflowClient()
    for run in client.search_runs([client.get_experiment_by_name("evx").experiment_id], "tags.`sae_mlops.kind` = 'quick'"):
        analyses[Path(run.data.params["sae"]).name] = run.info.run_id
    after = probe("batchtopk", "evx")
    assert client.get_run(after).data.tags["sae_mlops.analysis_run_id"] == analyses["sae_batchtopk"]
    assert "sae_mlops.analysis_run_id" not in client.get_run(before).data.tags

    outcome = compare_and_log(["evx"], track=False, out_dir=tmp_path / "cmp")
    rows = {r["sae_name"]: r for _, r in outcome.table.iterrows()}
    for name, probe_run in (("sae_standard", before), ("sae_batchtopk", after)):
        logged = client.get_run(probe_run).data.metrics
        assert rows[name]["eval_run_ids"] == probe_run
        assert rows[name]["probe_acc_k1"] == logged["probe/sae_acc_k1"]
        assert rows[name]["probe_acc_k5"] == logged["probe/sae_acc_k5"]
        assert rows[name]["probe_acc_k1_low"] == logged["probe/sae_acc_k1_ci_low"]
    assert rows["sae_saelens"]["eval_run_ids"] == "" and pd.isna(rows["sae_saelens"]["probe_acc_k1"])
    evals = [v for v in outcome.verdicts if v.metric.startswith("probe/")]
    assert {(v.variant.split(" · ")[0], v.reference.split(" · ")[0], v.metric) for v in evals} == {
        ("sae_batchtopk", "sae_standard", "probe/sae_acc_k1"), ("sae_batchtopk", "sae_standard", "probe/sae_acc_k5")}
    for v in evals:
        assert v.variant_value == client.get_run(after).data.metrics[v.metric]
        assert v.reference_value == client.get_run(before).data.metrics[v.metric]
    assert "probe acc k=1" in (tmp_path / "cmp" / "comparison.md").read_text()
