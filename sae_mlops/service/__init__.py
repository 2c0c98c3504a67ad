"""Registry-triggered analysis: ``sae-mlops serve``.

A new SAE version registered in MLflow gets analysed without anyone running a command:

- `app`: the FastAPI app. ``POST /webhooks/mlflow`` receives MLflow model-registry webhooks, checks
  the signature, the timestamp and the delivery id (`signature`), asks the policy (`policy`) what to
  run and puts jobs on the durable queue (`queue`). ``GET /health`` reports queue depth, workers and
  the tracking server's reachability; the read endpoints need a token off loopback.
- `queue`: a SQLite (WAL) job queue and delivery log that survive restarts.
- `worker`: one thread per device; each job runs in its own process (`job`), one at a time, with a
  timeout and bounded retries. The results go back to the registry (`mlflow_io`): status, run id and
  headline metrics as model-version tags, and an alias when the policy's quality gate passes.
  MLflow failures are sorted into unavailable (retried without an attempt, up to an outage limit),
  denied (failed at once) and bugs (an attempt used); each job has exactly one FINISHED run.
- `reconciler`: at start and periodically, scans the registry for versions the policy covers that
  have no analysis and enqueues them (MLflow gives up on a webhook after a few failed deliveries).
- `settings`: configuration (a pydantic model) from a file (YAML/TOML/JSON) and ``SAE_MLOPS_*``
  environment variables.
- `service`: wires the above together (start/stop), used by the app's lifespan.

Only `mlflow_io` (and the job process, through `sae_mlops.workflows`) talks to MLflow.
"""
