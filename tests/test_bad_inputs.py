"""A catalogue of bad inputs, every command: exit code 2, one sentence, nothing left behind.

Each case runs the real command in-process (Typer's CliRunner) in an empty working directory, with
MLFLOW_TRACKING_URI on a sqlite store outside it (or on a closed port, where that is the bad
input). It asserts: exit code 2; exactly one line on stderr starting with "Error:", holding the
expected words; no "Traceback" anywhere; nothing on stdout; and no leftovers: the working
directory is still empty and the shared inputs are unchanged (no output directory, nothing that
looks like a result). The documentation's troubleshooting page (docs/reference/troubleshooting.md) is
generated from these cases and tests/bad_inputs_fixes.yaml (scripts/gen_reference.py).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae_mlops.cli import app

runner = CliRunner()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs shared by every case (read-only for the cases): SAEs, corpora, checkpoints, a tiny
    activation database, an interrupted one, finished analysis directories, service files."""
    from sae_mlops.outputs.activation_db.writer import ActivationDBWriter
    from sae_mlops.demo import demo_corpus_path, demo_sae_path, ensure_demo_assets
    from sae_mlops.core.results import AnalysisResult
    from test_actdb import _build, _steps

    ensure_demo_assets()
    w = tmp_path_factory.mktemp("world")
    paths = {
        "std": str(demo_sae_path("standard")),
        "btk": str(demo_sae_path("batchtopk")),
        "sl": str(demo_sae_path("saelens")),
        "corpus": str(demo_corpus_path()),
        "w": str(w),
    }
    (w / "afile").write_text("not a directory\n")
    (w / "emptydir").mkdir()
    # corpora
    (w / "bad.json").write_text('["unterminated", ')
    (w / "dict.json").write_text('{"text": "one document"}')
    (w / "nums.json").write_text('["a document", 3]')
    (w / "nofield.jsonl").write_text('{"body": "a document"}\n')
    (w / "badline.jsonl").write_text('{"text": "a document"}\n{oops\n')
    (w / "blank.txt").write_text("  \n\n \t\n")
    (w / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (w / "short.json").write_text('["Hello"]')
    import json as _json

    (w / "onetoken.json").write_text(_json.dumps(["the", "a", "x", "The"] * 50_000))  # 200,000 one-token documents
    import pandas as pd

    pd.DataFrame({"body": ["a document"]}).to_parquet(w / "nocol.parquet")
    pd.DataFrame({"text": [1, 2]}).to_parquet(w / "intcol.parquet")
    (w / "fake.parquet").write_text("not parquet")
    # local checkpoints: no tokenizer files; a tokenizer of another vocabulary
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_ctx=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    for name in ("ckpt_notok", "ckpt_badvocab"):
        GPT2LMHeadModel(config).save_pretrained(w / name)
    tok_dir = Path(paths["std"]).parent / "model" / "tokenizer"  # the demo tokenizer: 2048 entries
    for f in tok_dir.iterdir():
        (w / "ckpt_badvocab" / f.name).write_bytes(f.read_bytes())
    # a Qwen3 checkpoint built for 32 positions (TransformerLens alone would give it n_ctx 2048)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen = Qwen3Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=16, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    Qwen3ForCausalLM(qwen).save_pretrained(w / "ckpt_short")
    for f in tok_dir.iterdir():
        (w / "ckpt_short" / f.name).write_bytes(f.read_bytes())
    (w / "ckpt_noconfig").mkdir()
    (w / "ckpt_noconfig" / "weights.bin").write_bytes(b"\0")
    # SAE directories that are not SAEs
    (w / "sae_badcfg").mkdir()
    (w / "sae_badcfg" / "config.json").write_text("{not json")
    (w / "sae_badcfg" / "weights.pt").write_bytes(b"\0")
    # SAEs whose weights are not finite: NaN in two encoder columns (prior format), Inf in the decoder (SAELens)
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(paths["std"], w / "sae_nan")
    weights = torch.load(w / "sae_nan" / "weights.pt", weights_only=True)
    weights["W_enc"][:, 3] = float("nan")
    weights["W_enc"][5, 7] = float("nan")
    torch.save(weights, w / "sae_nan" / "weights.pt")
    shutil.copytree(paths["sl"], w / "sae_inf")
    tensors = load_file(w / "sae_inf" / "sae_weights.safetensors")
    tensors["W_dec"][11, 0] = float("inf")
    save_file(tensors, w / "sae_inf" / "sae_weights.safetensors")
    # activation databases: a complete tiny one, an interrupted one
    _build(w / "analysis", _steps(seed=3))
    partial = ActivationDBWriter(w / "interrupted" / "activation_database" / "activation_db_x", d_sae=6, shard_rows=5)
    for s in _steps():
        partial.update(s)
    # analysis directories for `log`
    result = AnalysisResult(kind="quick", params={"sae": "x"}, metrics={"sparsity/l0_mean": 1.0})
    done = w / "done"
    (done / "results").mkdir(parents=True)
    (done / "results" / "analysis_results_x.json").write_text(result.to_json())
    (done / "SUMMARY_x.md").write_text("# done\n")
    nosummary = w / "nosummary"
    (nosummary / "results").mkdir(parents=True)
    (nosummary / "results" / "analysis_results_x.json").write_text(result.to_json())
    broken = w / "broken"
    (broken / "results").mkdir(parents=True)
    (broken / "results" / "analysis_results_x.json").write_text('{"kind": "quick"}')
    (broken / "SUMMARY_x.md").write_text("# broken\n")
    fullish = w / "fullish"  # a full analysis's feature summaries (3 features) and nothing else
    (fullish / "results").mkdir(parents=True)
    (fullish / "results" / "feature_summaries.jsonl").write_text("".join('{"feature": %d}\n' % i for i in range(3)))
    withpart = w / "withpart"
    (withpart / "results").mkdir(parents=True)
    (withpart / "results" / "analysis_results_x.json").write_text(result.to_json())
    (withpart / "SUMMARY_x.md").write_text("# partial\n")
    (withpart / "activation_database" / "activation_db_x.partial").mkdir(parents=True)
    # service settings and policies
    (w / "bad.yaml").write_text("port: [1\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "unknown.yaml").write_text("colour: blue\n")
    (w / "port.yaml").write_text("port: 70000\n")
    (w / "attempts.yaml").write_text("max_attempts: 0\n")
    (w / "logfmt.yaml").write_text("log_format: xml\n")
    (w / "policy_bad.yaml").write_text("rules: [\n")
    (w / "policy_unknown.yaml").write_text("rulez: []\n")
    (w / "policy_kind.yaml").write_text("defaults:\n  deep: {}\n")
    (w / "policy_rules.yaml").write_text("rules: []\n")
    # one sqlite tracking store for every case (created once: its schema migration takes seconds)
    from mlflow.tracking import MlflowClient

    store = tmp_path_factory.mktemp("store")
    paths["store_uri"] = f"sqlite:///{store / 'mlflow.db'}"
    MlflowClient(paths["store_uri"]).search_experiments()
    return paths


SECRET = {"SAE_MLOPS_WEBHOOK_SECRET": "s3cret"}
CLOSED = "http://127.0.0.1:{port}"
Q = ["quick", "--model", "demo", "--no-track", "-q"]
F = ["full", "--model", "demo", "--no-track", "-q"]

# (id, argv, extra environment, words the one error line must hold). Placeholders: {w} shared inputs,
# {t} this case's empty working directory, {std}/{btk}/{sl} demo SAEs, {corpus} the demo corpus,
# {port} a closed loopback port.
CASES = [
    # --- quick: the SAE
    ("quick-sae-missing", ["quick", "--sae", "{w}/nope", "--model", "demo", "--no-track"], {}, "does not exist"),
    ("quick-sae-file", ["quick", "--sae", "{w}/afile", "--model", "demo", "--no-track"], {}, "afile"),
    ("quick-sae-empty-dir", ["quick", "--sae", "{w}/emptydir", "--model", "demo", "--no-track"], {}, "neither SAE layout"),
    ("quick-sae-bad-config", ["quick", "--sae", "{w}/sae_badcfg", "--model", "demo", "--no-track"], {}, "config.json"),
    ("quick-sae-unknown-run", ["quick", "--sae", "runs:/0123456789abcdef/sae", "--model", "demo"], {}, "does not exist"),
    ("quick-sae-unknown-model", ["quick", "--sae", "models:/nope/1", "--model", "demo"], {}, "'nope'"),
    ("quick-sae-unknown-alias", ["quick", "--sae", "models:/nope@champion", "--model", "demo"], {}, "'nope'"),
    ("quick-sae-nan-weights", [*Q, "--sae", "{w}/sae_nan"], {}, "has non-finite weights (W_enc holds 65 NaN; 2 feature(s) affected: 3, 7)"),
    ("full-sae-inf-weights", [*F, "--sae", "{w}/sae_inf"], {}, "has non-finite weights (W_dec holds 1 Inf; 1 feature(s) affected: 11)"),
    ("quick-sae-missing-option", ["quick", "--model", "demo"], {}, "Missing option '--sae'"),
    # --- quick: options that do not apply, devices, sizes
    ("quick-topk-mode-standard", [*Q, "--sae", "{std}", "--topk-mode", "batch"], {}, "standard SAE, so --topk-mode does not apply"),
    ("quick-threshold-standard", [*Q, "--sae", "{std}", "--threshold", "0.5"], {}, "standard SAE, so --threshold does not apply"),
    ("quick-threshold-batch-mode", [*Q, "--sae", "{btk}", "--threshold", "0.5"], {}, "--threshold applies only with --topk-mode threshold"),
    ("quick-topk-mode-saelens", [*Q, "--sae", "{sl}", "--topk-mode", "threshold"], {}, "SAELens SAE, so --topk-mode does not apply"),
    ("quick-topk-mode-unknown", [*Q, "--sae", "{btk}", "--topk-mode", "sideways"], {}, "Invalid value for '--topk-mode'"),
    ("quick-device-unknown", [*Q, "--sae", "{std}", "--device", "toaster"], {}, "is not a torch device"),
    ("quick-device-absent-gpu", [*Q, "--sae", "{std}", "--device", "cuda:99"], {}, "cuda:99"),
    ("quick-dtype-unknown", [*Q, "--sae", "{std}", "--dtype", "float8"], {}, "dtype 'float8' is not supported"),
    ("quick-max-tokens-zero", [*Q, "--sae", "{std}", "--max-tokens", "0"], {}, "Invalid value for '--max-tokens'"),
    ("quick-batch-size-zero", [*Q, "--sae", "{std}", "--batch-size", "0"], {}, "Invalid value for '--batch-size'"),
    ("quick-context-size-one", [*Q, "--sae", "{std}", "--context-size", "1"], {}, "Invalid value for '--context-size'"),
    ("quick-context-size-over-nctx", [*Q, "--sae", "{std}", "--context-size", "4096"], {}, "exceeds the model's n_ctx 128"),
    ("quick-hook-unknown", [*Q, "--sae", "{std}", "--hook", "blocks.7.hook_resid_post"], {}, "is not a hook of model demo"),
    ("quick-hook-wrong-width", [*Q, "--sae", "{std}", "--hook", "blocks.0.mlp.hook_post"], {}, "has width 256"),
    # --- quick: the model
    ("quick-model-unknown-name", ["quick", "--sae", "{std}", "--model", "gpt7-imaginary", "--corpus", "{corpus}", "--no-track"], {}, "neither a local directory nor a TransformerLens model name"),
    ("quick-model-file", ["quick", "--sae", "{std}", "--model", "{w}/afile", "--corpus", "{corpus}", "--no-track"], {}, "is a file"),
    ("quick-model-no-config", ["quick", "--sae", "{std}", "--model", "{w}/ckpt_noconfig", "--corpus", "{corpus}", "--no-track"], {}, "not a Hugging Face checkpoint"),
    ("quick-context-size-over-checkpoint", ["quick", "--sae", "{std}", "--model", "{w}/ckpt_short", "--corpus", "{corpus}", "--context-size", "64", "--no-track"], {}, "exceeds the model's n_ctx 32"),
    ("quick-model-no-tokenizer", ["quick", "--sae", "{std}", "--model", "{w}/ckpt_notok", "--corpus", "{corpus}", "--no-track"], {}, "holds no tokenizer files"),
    ("quick-model-other-vocabulary", ["quick", "--sae", "{std}", "--model", "{w}/ckpt_badvocab", "--corpus", "{corpus}", "--no-track"], {}, "tokenizer of 2,048 entries but the model's vocabulary is 64"),
    ("quick-no-corpus-for-named-model", ["quick", "--sae", "{std}", "--model", "gpt2", "--no-track"], {}, "no corpus given"),
    # --- quick: the corpus
    ("quick-corpus-missing", [*Q, "--sae", "{std}", "--corpus", "{w}/nope.json"], {}, "does not exist"),
    ("quick-corpus-dir", [*Q, "--sae", "{std}", "--corpus", "{w}/emptydir"], {}, "is not a file"),
    ("quick-corpus-bad-json", [*Q, "--sae", "{std}", "--corpus", "{w}/bad.json"], {}, "is not valid JSON"),
    ("quick-corpus-json-dict", [*Q, "--sae", "{std}", "--corpus", "{w}/dict.json"], {}, "not a list"),
    ("quick-corpus-json-number", [*Q, "--sae", "{std}", "--corpus", "{w}/nums.json"], {}, "element 1 is a int"),
    ("quick-corpus-jsonl-no-field", [*Q, "--sae", "{std}", "--corpus", "{w}/nofield.jsonl"], {}, "--text-field"),
    ("quick-corpus-jsonl-bad-line", [*Q, "--sae", "{std}", "--corpus", "{w}/badline.jsonl"], {}, "line 2 is not valid JSON"),
    ("quick-corpus-blank", [*Q, "--sae", "{std}", "--corpus", "{w}/blank.txt"], {}, "holds no non-empty text"),
    ("quick-corpus-not-utf8", [*Q, "--sae", "{std}", "--corpus", "{w}/latin1.txt"], {}, "is not UTF-8"),
    ("quick-corpus-parquet-no-column", [*Q, "--sae", "{std}", "--corpus", "{w}/nocol.parquet"], {}, "has no 'text' column"),
    ("quick-corpus-parquet-int-column", [*Q, "--sae", "{std}", "--corpus", "{w}/intcol.parquet"], {}, "not string"),
    ("quick-corpus-not-parquet", [*Q, "--sae", "{std}", "--corpus", "{w}/fake.parquet"], {}, "not a readable Parquet file"),
    ("quick-corpus-shorter-than-a-window", [*Q, "--sae", "{std}", "--corpus", "{w}/short.json"], {}, "fewer than one window of 127"),
    ("quick-corpus-one-token-documents", [*Q, "--sae", "{std}", "--corpus", "{w}/onetoken.json"], {}, "gives 0 next-token predictions (each of its 200,000 analysable tokens ends its window"),
    # --- quick: where results go, where they are tracked
    ("quick-out-under-a-file", [*Q, "--sae", "{std}", "--out", "{w}/afile/out"], {}, "--out {w}/afile/out cannot be created"),
    ("quick-out-is-a-file", [*Q, "--sae", "{std}", "--out", "{w}/afile"], {}, "is an existing file"),
    ("quick-out-name-too-long", [*Q, "--sae", "{std}", "--out", "{t}/" + "x" * 300], {}, "longer than 255 bytes"),
    ("quick-out-in-proc", [*Q, "--sae", "{std}", "--out", "/proc/sae-mlops-out"], {}, "cannot be created or written"),
    ("quick-tracking-closed-port", ["quick", "--sae", "{std}", "--model", "demo", "-q"], {"MLFLOW_TRACKING_URI": CLOSED}, "is not reachable (connection refused)"),
    ("quick-tracking-postgres-driver-missing", ["quick", "--sae", "{std}", "--model", "demo", "-q"], {"MLFLOW_TRACKING_URI": "postgresql://sae:hunter22@127.0.0.1:{port}/mlflow"}, "needs the database driver psycopg (postgresql+psycopg), which is not installed"),
    ("quick-tracking-mysql-driver-missing", ["quick", "--sae", "{std}", "--model", "demo", "-q"], {"MLFLOW_TRACKING_URI": "mysql+pymysql://sae:hunter22@127.0.0.1:{port}/mlflow"}, "pip install PyMySQL"),
    ("quick-tracking-postgres-closed-port", ["quick", "--sae", "{std}", "--model", "demo", "-q"], {"MLFLOW_TRACKING_URI": "postgresql+psycopg2://sae:hunter22@127.0.0.1:{port}/mlflow"}, "sae:***@127.0.0.1:{port}/mlflow (MLFLOW_TRACKING_URI) refused the connection or did not answer (connection refused)"),
    ("quick-tracking-store-under-a-file", ["quick", "--sae", "{std}", "--model", "demo", "-q"], {"MLFLOW_TRACKING_URI": "sqlite:///{w}/afile/mlflow.db"}, "cannot be created or written"),
    # --- full
    ("full-topk-mode-standard", [*F, "--sae", "{std}", "--topk-mode", "threshold"], {}, "standard SAE"),
    ("full-cooccurrence-unknown", [*F, "--sae", "{std}", "--cooccurrence", "cosine"], {}, "Invalid value for '--cooccurrence'"),
    ("full-neighbours-zero", [*F, "--sae", "{std}", "--neighbours", "0"], {}, "Invalid value for '--neighbours'"),
    ("full-heatmap-one", [*F, "--sae", "{std}", "--heatmap-features", "1"], {}, "Invalid value for '--heatmap-features'"),
    ("full-out-under-a-file", [*F, "--sae", "{std}", "--out", "{w}/afile/full"], {}, "cannot be created"),
    ("full-corpus-shorter-than-a-window", [*F, "--sae", "{btk}", "--corpus", "{w}/short.json"], {}, "analysable tokens"),
    ("full-tracking-closed-port", ["full", "--sae", "{std}", "--model", "demo", "-q"], {"MLFLOW_TRACKING_URI": CLOSED}, "not reachable"),
    # --- db query
    ("db-path-missing", ["db", "query", "{w}/nope", "--feature", "0"], {}, "does not exist"),
    ("db-path-without-database", ["db", "query", "{w}/emptydir", "--feature", "0"], {}, "no activation database"),
    ("db-interrupted-database", ["db", "query", "{w}/interrupted", "--feature", "0"], {}, "incomplete"),
    ("db-no-question", ["db", "query", "{w}/analysis"], {}, "ask one question"),
    ("db-two-questions", ["db", "query", "{w}/analysis", "--feature", "1", "--token", "2"], {}, "one question per call"),
    ("db-feature-out-of-range", ["db", "query", "{w}/analysis", "--feature", "6"], {}, "out of range"),
    ("db-position-without-doc", ["db", "query", "{w}/analysis", "--position", "3"], {}, "--position goes with --doc"),
    ("db-format-unknown", ["db", "query", "{w}/analysis", "--feature", "0", "--format", "xml"], {}, "Invalid value for '--format'"),
    ("db-sql-copy-to-file", ["db", "query", "{w}/analysis", "--sql", "COPY (SELECT * FROM vocab) TO '{t}/stolen.csv'"], {}, "not COPY"),
    ("db-sql-read-passwd", ["db", "query", "{w}/analysis", "--sql", "SELECT * FROM read_csv('/etc/passwd')"], {}, "outside the database directory"),
    ("db-sql-read-text", ["db", "query", "{w}/analysis", "--sql", "SELECT * FROM read_text('{w}/afile')"], {}, "outside the database directory"),
    ("db-sql-two-statements", ["db", "query", "{w}/analysis", "--sql", "SELECT 1; DROP VIEW tokens"], {}, "2 statements"),
    ("db-sql-drop-view", ["db", "query", "{w}/analysis", "--sql", "DROP VIEW tokens"], {}, "not DROP"),
    ("db-sql-create-table", ["db", "query", "{w}/analysis", "--sql", "CREATE TABLE t AS SELECT 1"], {}, "not CREATE"),
    ("db-sql-set", ["db", "query", "{w}/analysis", "--sql", "SET enable_external_access = true"], {}, "not SET"),
    ("db-sql-pragma", ["db", "query", "{w}/analysis", "--sql", "PRAGMA version"], {}, "not PRAGMA"),
    ("db-sql-attach", ["db", "query", "{w}/analysis", "--sql", "ATTACH '{t}/x.duckdb'"], {}, "not ATTACH"),
    ("db-sql-install", ["db", "query", "{w}/analysis", "--sql", "INSTALL httpfs"], {}, "not LOAD"),
    ("db-sql-load", ["db", "query", "{w}/analysis", "--sql", "LOAD httpfs"], {}, "not LOAD"),
    ("db-sql-syntax", ["db", "query", "{w}/analysis", "--sql", "SELEC 1"], {}, "does not parse"),
    ("db-sql-blank", ["db", "query", "{w}/analysis", "--sql", "  "], {}, "--sql is empty"),
    # --- log
    ("log-dir-missing", ["log", "{w}/nope"], {}, "is not a directory"),
    ("log-not-a-dir", ["log", "{w}/afile"], {}, "is not a directory"),
    ("log-empty-dir", ["log", "{w}/emptydir"], {}, "holds no finished analysis"),
    ("log-no-summary", ["log", "{w}/nosummary"], {}, "holds no finished analysis"),
    ("log-broken-results", ["log", "{w}/broken"], {}, "not a readable results file"),
    ("log-partial-files", ["log", "{w}/withpart"], {}, "partial files"),
    ("log-tracking-closed-port", ["log", "{w}/done"], {"MLFLOW_TRACKING_URI": CLOSED}, "not reachable"),
    # --- train
    ("train-tokens-below-one-batch", ["train", "--training-tokens", "100", "--batch-size-tokens", "1024"], {}, "fewer than one batch"),
    ("train-negative-lr", ["train", "--lr", "-1"], {}, "--lr must be greater than 0"),
    ("train-k-over-d-sae", ["train", "--d-sae", "8", "--k", "16"], {}, "k (16) exceeds d_sae (8)"),
    ("train-architecture-unknown", ["train", "--architecture", "gated"], {}, "Invalid value for '--architecture'"),
    ("train-alias-without-register", ["train", "--alias", "champion"], {}, "--register"),
    ("train-out-not-empty", ["train", "--out", "{w}/done"], {}, "already exists and is not empty"),
    ("train-out-under-a-file", ["train", "--out", "{w}/afile/sae"], {}, "cannot be created"),
    ("train-no-hook-for-named-model", ["train", "--model", "gpt2", "--corpus", "{corpus}"], {}, "no hook given"),
    ("train-tracking-closed-port", ["train"], {"MLFLOW_TRACKING_URI": CLOSED}, "not reachable"),
    # --- import
    ("import-dir-missing", ["import", "{w}/nope"], {}, "does not exist"),
    ("import-not-an-sae", ["import", "{w}/emptydir"], {}, "neither SAE layout"),
    ("import-alias-without-register", ["import", "{std}", "--alias", "champion"], {}, "--register"),
    ("import-tracking-closed-port", ["import", "{std}"], {"MLFLOW_TRACKING_URI": CLOSED}, "not reachable"),
    # --- compare
    ("compare-experiment-unknown", ["compare", "-e", "no-such-experiment", "--no-track"], {}, "does not exist"),
    ("compare-nothing-to-compare", ["compare", "--no-track"], {}, "No quick or full analysis runs"),
    ("compare-filter-invalid", ["compare", "--filter", "metrics.l0 <<< 3", "--no-track"], {}, "--filter"),
    ("compare-out-under-a-file", ["compare", "--out", "{w}/afile/cmp"], {}, "cannot be created"),
    ("compare-tracking-closed-port", ["compare", "--no-track"], {"MLFLOW_TRACKING_URI": CLOSED}, "not reachable"),
    # --- report
    ("report-nothing-named", ["report"], {}, "name the analysis"),
    ("report-dir-missing", ["report", "--analysis-dir", "{w}/nope"], {}, "does not exist"),
    ("report-dir-not-full", ["report", "--analysis-dir", "{w}/done"], {}, "no feature summaries"),
    ("report-features-not-numbers", ["report", "--analysis-dir", "{w}/done", "--features", "a,b"], {}, "comma-separated feature indices"),
    ("report-features-out-of-range", ["report", "--analysis-dir", "{w}/fullish", "--features", "2,2,99999", "--out", "{t}/r"], {}, "--features 99999 out of range: this SAE has features 0..2"),
    ("report-notebook-missing", ["report", "--analysis-dir", "{w}/done", "--notebook", "{w}/nope.ipynb"], {}, "does not exist"),
    ("report-out-under-a-file", ["report", "--analysis-dir", "{w}/done", "--out", "{w}/afile/r"], {}, "cannot be created"),
    ("report-run-unknown", ["report", "--run-id", "0123456789abcdef"], {}, "0123456789abcdef"),
    ("report-threshold-above-one", ["report", "--analysis-dir", "{w}/done", "--top1-threshold", "2"], {}, "Invalid value for '--top1-threshold'"),
    # --- serve: settings and policy files
    ("serve-no-secret", ["serve"], {}, "No webhook secret"),
    ("serve-secret-file-missing", ["serve"], {"SAE_MLOPS_WEBHOOK_SECRET_FILE": "{w}/nope.secret"}, "cannot be read"),
    ("serve-config-missing", ["serve", "--config", "{w}/nope.yaml"], SECRET, "cannot be read"),
    ("serve-config-bad-yaml", ["serve", "--config", "{w}/bad.yaml"], SECRET, "bad.yaml"),
    ("serve-config-not-a-mapping", ["serve", "--config", "{w}/list.yaml"], SECRET, "list.yaml"),
    ("serve-config-unknown-key", ["serve", "--config", "{w}/unknown.yaml"], SECRET, "colour"),
    ("serve-config-port-out-of-range", ["serve", "--config", "{w}/port.yaml"], SECRET, "70000"),
    ("serve-config-max-attempts-zero", ["serve", "--config", "{w}/attempts.yaml"], SECRET, "max_attempts"),
    ("serve-log-format-unknown", ["serve", "--log-format", "xml"], SECRET, "log_format"),
    ("serve-port-env-not-a-number", ["serve"], {**SECRET, "SAE_MLOPS_PORT": "eighty"}, "SAE_MLOPS_PORT"),
    ("serve-policy-missing", ["serve", "--policy", "{w}/nope.yaml"], SECRET, "cannot be read"),
    ("serve-policy-bad-yaml", ["serve", "--policy", "{w}/policy_bad.yaml"], SECRET, "policy_bad.yaml"),
    ("serve-policy-unknown-key", ["serve", "--policy", "{w}/policy_unknown.yaml"], SECRET, "rulez"),
    ("serve-policy-unknown-kind", ["serve", "--policy", "{w}/policy_kind.yaml"], SECRET, "deep"),
    ("serve-policy-empty-rules", ["serve", "--policy", "{w}/policy_rules.yaml"], SECRET, "rules"),
]


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture()
def clean_env(world, tmp_path, monkeypatch):
    """An empty working directory, the sqlite store outside it, no stray MLflow/service variables."""
    import mlflow

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI", "SAE_MLOPS_CONFIG",
                "SAE_MLOPS_POLICY_FILE", "SAE_MLOPS_WEBHOOK_SECRET", "SAE_MLOPS_WEBHOOK_SECRET_FILE", "SAE_MLOPS_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["store_uri"])
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    return work


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case_id, argv, env, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, clean_env, case_id, argv, env, words):
    fill = {**world, "t": str(clean_env), "port": str(_closed_port())}
    args = [a.format(**fill) for a in argv]
    env = {k: v.format(**fill) for k, v in env.items()}
    words = words.format(**fill)
    shared = Path(world["w"])
    before = _tree(shared)

    r = runner.invoke(app, args, env=env, terminal_width=400)

    assert r.exit_code == 2, f"{case_id}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert "Traceback" not in r.output
    assert "hunter22" not in r.output, "a password from the tracking URI was shown"
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    assert words in errors[0], f"{case_id}: {words!r} not in {errors[0]!r}"
    assert r.stdout.strip() == "", r.stdout
    assert _tree(clean_env) == set(), f"{case_id} left {sorted(_tree(clean_env))}"
    assert _tree(shared) == before, f"{case_id} changed the shared inputs: {sorted(_tree(shared) ^ before)}"


def test_the_catalogue_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1][0] if c[1][0] != "db" else "db query" for c in CASES}
    assert commands >= {"quick", "full", "train", "import", "compare", "report", "db query", "log", "serve"}


def test_the_troubleshooting_page_lists_every_case():
    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "troubleshooting.md").read_text(encoding="utf-8")
    missing = [c[0] for c in CASES if f"| `{c[0]}` |" not in page]
    assert not missing, f"docs/reference/troubleshooting.md lacks {missing} (add them to tests/bad_inputs_fixes.yaml, run make docs)"
