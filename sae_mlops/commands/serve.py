"""`sae-mlops serve`: the registry-triggered analysis service (see `sae_mlops.service`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sae_mlops.commands.app import state, app, report_input_errors


@app.command()
@report_input_errors
def serve(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Settings file (YAML, TOML or JSON). (default: $SAE_MLOPS_CONFIG, if set)"
    ),
    host: Optional[str] = typer.Option(None, "--host", help="Interface to listen on. (default: $SAE_MLOPS_HOST, else 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, "--port", help="Port to listen on. (default: $SAE_MLOPS_PORT, else 8080)"),
    policy: Optional[Path] = typer.Option(
        None, "--policy", help="Policy file (YAML/JSON): which models, aliases and tags trigger which analyses, and the "
        "quality gate. (default: $SAE_MLOPS_POLICY_FILE, else a quick analysis of every new version)"
    ),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Queue database, job logs and outputs. (default: $SAE_MLOPS_DATA_DIR, else ./sae-mlops-service)"
    ),
    devices: Optional[str] = typer.Option(
        None, "--devices", help="Comma-separated devices, one worker each (auto, cpu, cuda:0...). (default: auto)"
    ),
    log_format: Optional[str] = typer.Option(None, "--log-format", help="text or json (one JSON object per line). (default: text)"),
) -> None:
    """Receive MLflow model-registry webhooks and analyse new SAE versions.

    Verifies each delivery (X-MLflow-Signature with $SAE_MLOPS_WEBHOOK_SECRET), queues the analyses
    the policy asks for in a durable SQLite queue, runs each in its own process, and writes status,
    run id and headline metrics back to the model version as tags (and an alias when the quality
    gate passes). A reconciler enqueues versions the webhooks missed. MLflow: $MLFLOW_TRACKING_URI.
    Endpoints: POST /webhooks/mlflow, GET /health, GET /jobs. Off loopback, GET /jobs and the
    details of /health need "Authorization: Bearer $SAE_MLOPS_READ_TOKEN".
    """
    from sae_mlops.service.logs import setup_service_logging
    from sae_mlops.service.settings import load_settings

    settings = load_settings(
        config,
        overrides={
            "host": host,
            "port": port,
            "policy_file": policy,
            "data_dir": data_dir,
            "devices": devices,
            "log_format": log_format,
        },
    )
    settings.secret()  # fail now, with one sentence, when no secret is configured
    if state.get("verbose"):
        settings.log_level = "DEBUG"
    setup_service_logging(settings.log_format, settings.log_level)
    from sae_mlops.service.app import run_server

    run_server(settings)
