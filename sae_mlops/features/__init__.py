"""Per-feature work on full analyses: matching features across SAEs (`match`), static per-feature
dashboards (`dashboard`) and LLM labels with detection scores (`label`). No MLflow here; logging
goes through `sae_mlops.tracking.features`."""
