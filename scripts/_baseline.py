"""The baselines the benchmarks divide by: the compute any analysis must do.

- :func:`necessary_model_compute` (the model alone): per batch one forward to the hook plus two
  continuations from it to the logits (clean and SAE-spliced; the zero-ablated continuation is a
  constant of model and hook, computed once per run, so it is not counted);
- :func:`necessary_compute` (model + SAE): the same plus the SAE's encoder and decoder on every
  analysed token, spliced back into the SAE continuation.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def necessary_model_compute(engine, batches, device: str) -> None:
    """One forward to the hook plus two continuations to the logits per batch (no SAE)."""
    for b in batches:
        tokens = b.tokens.to(device)
        act, _ = engine.hook_activations(tokens)
        for variant in (act, act):
            engine.continue_to_logits(variant, tokens)


@torch.no_grad()
def necessary_compute(engine, batches, device: str) -> None:
    """The model as in :func:`necessary_model_compute` plus the SAE's encode and decode of every
    analysed token, whose reconstruction feeds the second continuation."""
    for b in batches:
        tokens = b.tokens.to(device)
        analysed = b.analysed.to(device)
        act, _ = engine.hook_activations(tokens)
        view = engine.site.view(act)
        _f, x_hat = engine.encode_decode(view[analysed])
        spliced = view.clone()
        spliced[analysed] = x_hat.to(view.dtype)
        engine.continue_to_logits(act, tokens)
        engine.continue_to_logits(engine.site.write(act, spliced), tokens)
