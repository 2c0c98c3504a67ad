"""The baseline both benchmarks divide by: the necessary model compute of an analysis."""

from __future__ import annotations

import torch


@torch.no_grad()
def necessary_model_compute(engine, batches, device: str) -> None:
    """One forward to the hook plus three continuations from it to the logits (clean, SAE,
    zero) for every batch = one clean forward + two continuations, at every position."""
    for b in batches:
        tokens = b.tokens.to(device)
        act, _ = engine.hook_activations(tokens)
        for variant in (act, act, torch.zeros_like(act)):
            engine.continue_to_logits(variant, tokens)
