"""`sae-mlops label RUN_OR_DIR`: LLM labels and detection scores for features (one library call:
`sae_mlops.features.label.label_features`), logged to the analysis run under `labels/`."""

from __future__ import annotations

from typing import Optional

import typer

from sae_mlops.commands.app import app, out_console, report_input_errors, set_quiet


@app.command()
@report_input_errors
def label(
    analysis: str = typer.Argument(..., help="Output directory of `sae-mlops full`, an MLflow run id or runs:/<run_id>."),
    model: str = typer.Option("gpt-4o-mini", "--model", help="Model name at the endpoint (e.g. a vLLM or Ollama model name)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1 (Ollama). (default: OpenAI)"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (never logged; not needed with --base-url for servers without keys)."),
    features: Optional[str] = typer.Option(None, "--features", help="Features to label, comma-separated (added to --top)."),
    top: int = typer.Option(200, "--top", min=0, help="Also the N most frequent features that fired."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight at once."),
    rpm: float = typer.Option(60.0, "--rpm", min=0.0, help="Requests per minute at most (0: no limit)."),
    max_tries: int = typer.Option(3, "--max-tries", min=1, help="Answers per request before a malformed answer gives the feature up."),
    http_retries: int = typer.Option(5, "--http-retries", min=0, help="Retries with backoff on 429, 5xx, timeouts and connection errors."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.1, help="Seconds per request."),
    examples: int = typer.Option(15, "--examples", min=1, help="Top activating examples in the label prompt."),
    n_activating: int = typer.Option(5, "--detection-activating", min=1, help="Held-out activating snippets per detection request."),
    n_non: int = typer.Option(5, "--detection-non-activating", min=0, help="Non-activating snippets per detection request."),
    non_activating_quantile: float = typer.Option(0.0, "--non-activating-quantile", min=0.0, max=1.0, help="A non-activating snippet's window holds no activation above this quantile of the feature's non-zero activations (0: none at all); features with too few such windows are not scored."),
    no_detection: bool = typer.Option(False, "--no-detection", help="Labels only (one request per feature)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the detection snippets."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="MLflow run to log to when ANALYSIS is a local directory."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log the labels and metrics to the analysis run (when it is known)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Label features with an LLM (label, description, category, monosemantic, 1-5 score, domain,
    abstraction level) and score each label by detection (held-out activating vs non-activating
    snippets). Resumes: features already in labels/labels.jsonl are skipped."""
    from sae_mlops.features.label import PROMPT_VERSION, LabelOptions, label_features
    from sae_mlops.features.sources import RUNS_DIR, resolve_analysis, run_id_of
    from sae_mlops.interp.notebook_report import parse_features

    set_quiet(quiet)
    rid = run_id_of(analysis)
    ref = resolve_analysis(analysis, activation_db=not no_detection, run_id=run_id, download_to=RUNS_DIR / rid if rid else None)
    opts = LabelOptions(
        model=model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency, rpm=rpm, max_tries=max_tries,
        http_retries=http_retries, timeout=timeout, examples=examples, n_activating=n_activating, n_non=n_non,
        seed=seed, detection=not no_detection, non_activating_quantile=non_activating_quantile,
    )
    outcome = label_features(ref.root, opts, parse_features(features), top=top)
    m = outcome.metrics
    out_console.print(
        f"Labelled {outcome.labelled_now} features now ({outcome.skipped} already labelled, {len(outcome.failed)} failed); "
        f"{int(m['label/features_labelled'])} in {outcome.labels_file}",
        soft_wrap=True, highlight=False,
    )
    out_console.print(
        f"Mean interpretability {m['label/mean_interpretability']:.2f}, monosemantic {m['label/share_monosemantic']:.2f}, "
        f"detection balanced accuracy {m['label/mean_detection_balanced_accuracy']:.2f} on {int(m['label/features_scored'])} scored "
        f"features ({int(m['label/features_not_scored'])} not scored: too few activating or non-activating snippets); {int(m['label/requests'])} requests, "
        f"{int(m['label/tokens_total']):,} tokens",
        soft_wrap=True, highlight=False,
    )
    if outcome.failed:
        out_console.print(f"Not labelled (run again to retry): {', '.join(map(str, outcome.failed[:20]))}", soft_wrap=True, highlight=False)
    if ref.run_id and log:
        from sae_mlops.tracking.features import log_labels

        log_labels(ref.run_id, outcome.files, outcome.out_dir, m, model, base_url, PROMPT_VERSION)
        out_console.print(f"Logged to MLflow run {ref.run_id} under labels/ (run `sae-mlops dashboard` to show the labels)", soft_wrap=True, highlight=False)
