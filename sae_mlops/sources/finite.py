"""Non-finite SAE weights are refused before the pass (one sentence naming the tensors and features).

An SAE whose training diverged can hold NaN or Inf; with them every metric is NaN or, worse,
plausible-looking (a NaN encoder column gives a dead feature and a normal loss recovered). The
loaders call `check_finite_tensors` on the raw tensors before anything computes with them.
"""

from __future__ import annotations

from typing import Any

from sae_mlops.errors import InputError


def check_finite_tensors(tensors: dict[str, Any], d_sae: int, label: str) -> None:
    """`InputError` (one sentence naming the tensors, the counts and the first affected features)
    when any weight of the SAE (W_enc, b_enc, W_dec, b_dec, threshold...: every tensor of its
    state) holds NaN or Inf. A feature is affected when its encoder column, decoder row, encoder
    bias or threshold is not finite; a non-finite decoder bias affects every feature."""
    import torch

    bad: list[str] = []
    features: set[int] = set()
    everything = False
    for name, t in tensors.items():
        if not (torch.is_tensor(t) and t.is_floating_point()):
            continue
        finite = torch.isfinite(t.detach())
        if bool(finite.all()):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        bad.append(f"{name} holds {', '.join(p for p in (f'{nan:,} NaN' if nan else '', f'{inf:,} Inf' if inf else '') if p)}")
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "b_dec":
            everything = True
        elif t.dim() == 2 and t.shape[1] == d_sae and leaf.startswith("W_enc"):
            features.update(int(i) for i in torch.nonzero(~finite.all(dim=0)).flatten().tolist())
        elif t.dim() == 2 and t.shape[0] == d_sae:
            features.update(int(i) for i in torch.nonzero(~finite.all(dim=1)).flatten().tolist())
        elif t.dim() == 1 and t.shape[0] == d_sae:
            features.update(int(i) for i in torch.nonzero(~finite).flatten().tolist())
        else:
            everything = True
    if not bad:
        return
    if everything:
        affected = "every feature is affected"
    else:
        first = ", ".join(str(i) for i in sorted(features)[:8])
        affected = f"{len(features):,} feature(s) affected: {first}{', ...' if len(features) > 8 else ''}"
    raise InputError(
        f"SAE {label} has non-finite weights ({'; '.join(bad)}; {affected}), so every metric would be NaN or "
        "meaningless; re-export it from a checkpoint saved before training diverged."
    )
