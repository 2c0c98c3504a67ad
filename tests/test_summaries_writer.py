"""The feature-summaries writer writes exactly what ``json.dumps`` of the documented line writes."""

from __future__ import annotations

import json

import numpy as np
import torch

from sae_mlops.core.collectors.examples import TopExamplesCollector
from sae_mlops.core.results import json_safe
from sae_mlops.outputs.full_reports import context_string, write_feature_summaries


def _reference_line(i, pf, kept, vocab, lens):
    top = []
    for ex in kept:
        centre = ex["context_ids"][len(ex["context_ids"]) // 2]
        top.append({"token": vocab[centre], "token_id": centre, "activation": ex["activation"],
                    "context": context_string(ex["context_ids"], vocab), "position": ex["position"],
                    "text_idx": ex["text_idx"], "global_idx": ex["global_idx"]})
    line = {"feature": i, "activation_frequency": int(pf["firing_count"][i]), "firing_fraction": pf["frequency"][i],
            "mean_activation": pf["mean_activation"][i], "max_activation": pf["max_activation"][i], "top_examples": top}
    if lens is not None:
        line["logit_lens"] = {
            side: [[vocab[int(t)], round(float(v), 4)] for t, v in zip(lens[f"{side}_ids"][i], lens[f"{side}_values"][i], strict=True)]
            for side in ("top", "bottom")
        }
    return json.dumps(json_safe(line), ensure_ascii=False)


def test_lines_equal_json_dumps(tmp_path):
    d, k, w = 9, 4, 3
    ex = TopExamplesCollector(d, k, w)
    g = torch.Generator().manual_seed(0)
    vocab = ["a", "é\n", '"q"', "\\", "[[x]]", "tab\t", "ü", "z"]
    for f in range(d):
        n = [0, 1, 4, 4, 2, 0, 3, 4, 1][f]
        ex.value[f, :n] = torch.rand(n, generator=g)
        ex.token[f, :n] = torch.arange(n) + 10 * f
        ex.doc[f, :n] = f
        ex.pos[f, :n] = torch.arange(n)
        ex.ctx[f, :n] = torch.randint(-1, len(vocab), (n, 2 * w + 1), generator=g, dtype=torch.int32)
        ex.ctx[f, :n, w] = torch.randint(0, len(vocab), (n,), generator=g, dtype=torch.int32)
    counts = [0, 3, 9, 7, 2, 0, 5, 11, 1]
    pf = {"firing_count": counts, "frequency": [c / 13 for c in counts],
          "mean_activation": [0.5, 1 / 3, float("nan"), 2.0, 1e-9, 0.0, 3.25, float("inf"), 7.0],
          "max_activation": [1.0] * d}
    lens = {"top_ids": np.array([[1, 2]] * d), "top_values": np.array([[1.23456, -0.5]] * d, dtype=np.float32),
            "bottom_ids": np.array([[3, 0]] * d), "bottom_values": np.array([[-2.0, 1e-5]] * d, dtype=np.float32)}
    for lens_ in (None, lens):
        path = write_feature_summaries(tmp_path / "fs.jsonl", pf, ex, vocab, lens_)
        fired = [i for i in range(d) if counts[i] > 0]
        expected = [_reference_line(i, pf, kept, vocab, lens_) for i, kept in zip(fired, ex.all_examples(fired), strict=True)]
        assert path.read_text(encoding="utf-8").splitlines() == expected
