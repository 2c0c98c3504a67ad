"""Evals that say whether an SAE's latents are the concepts a researcher wants: k-sparse probing
(`probe`), first-letter feature absorption (`absorption`) and the auto-interpretability summary
(`autointerp`), with their activation cache (`activations`), datasets (`datasets`) and files
(`report`). Pure computation: the model runs through `sae_mlops.core.engine`, nothing here talks to
MLflow (`sae_mlops.tracking.evals` logs the results)."""
