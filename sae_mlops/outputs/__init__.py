"""Files an analysis writes: the activation database, summaries, full-analysis reports, plots and
the comparison table. Pure functions of results; no model, no MLflow."""
