"""CE/KL reduction cost by logits chunk size: ``Engine.next_token_stats`` on 2032 rows (d_model 512,
vocab 32768; a clean, an edited and a one-row variant) against two plain unembedding GEMMs, in CPU
seconds, median of 3 interleaved rounds, one thread. Prints JSON; asserts nothing.

    python scripts/benchmark_vocab_chunks.py
"""

from __future__ import annotations

import json
import statistics
import time
from types import SimpleNamespace

import torch

from sae_mlops.core.engine import Engine


def main() -> None:
    torch.set_num_threads(1)
    n, d_model, vocab = 2032, 512, 32768
    w_u, b_u = torch.randn(d_model, vocab) / d_model**0.5, torch.zeros(vocab)
    model = SimpleNamespace(W_U=w_u, b_U=b_u, cfg=SimpleNamespace(
        d_vocab_out=vocab, normalization_type=None, output_logits_soft_cap=None, n_layers=1))
    engine = Engine.__new__(Engine)  # only the CE/KL reduction is used: no model, no SAE
    engine.model, engine.device, engine.final_is_logits = model, "cpu", False
    finals = [torch.randn(n, d_model), torch.randn(n, d_model), torch.randn(1, d_model)]
    next_token = torch.randint(0, vocab, (n,))
    res: dict[str, list[float]] = {}
    for _ in range(3):
        for elements in (1 << 19, 1 << 21, 1 << 23):
            engine.vocab_chunk_elements, engine._scratch_bufs = elements, []
            c0 = time.process_time()
            engine.next_token_stats(finals, next_token)
            res.setdefault(f"chunk_rows_{elements // vocab}", []).append(time.process_time() - c0)
        c0 = time.process_time()
        torch.addmm(b_u, finals[0], w_u)
        torch.addmm(b_u, finals[1], w_u)
        res.setdefault("two_unembedding_gemms", []).append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in res.items()}
    med.update({f"{k}_over_gemms": v / med["two_unembedding_gemms"] for k, v in list(med.items()) if k.startswith("chunk")})
    print(json.dumps(med, indent=2))


if __name__ == "__main__":
    main()
