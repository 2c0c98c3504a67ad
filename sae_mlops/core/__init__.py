"""The analysis core: the engine (one streaming pass), token windows, collectors, matrices,
logit lens and the result type. No MLflow, no files beyond what collectors are handed."""
