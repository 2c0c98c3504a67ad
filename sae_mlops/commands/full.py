"""`sae-mlops full` and `sae-mlops db query` (full analysis and its activation database)."""
