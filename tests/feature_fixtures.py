"""Small demo full analyses for the feature commands (match, dashboard, label): the demo model and
corpus, a token budget of a few thousand, no MLflow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def demo_full(out: Path, sae: Path | None = None, max_tokens: int = 1500) -> Path:
    """Run the full analysis of ``sae`` (default: the demo standard SAE) on the demo corpus into ``out``."""
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.analyses.full import FullOptions, run_full

    cfg = AnalysisConfig(sae=str(sae or demo_sae_path("standard")), model="demo", max_tokens=max_tokens, device="cpu", progress=False)
    run_full(cfg, out, FullOptions(examples_per_feature=8, heatmap_features=20))
    return out


def permuted_sae(src: Path, dst: Path, perm: np.ndarray, noise: float = 0.0, seed: int = 0) -> Path:
    """A prior-format SAE whose feature i is feature perm[i] of ``src`` (encoder and decoder), with
    Gaussian noise of relative size ``noise`` added to the decoder rows."""
    import torch

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "history.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    state = torch.load(src / "weights.pt", map_location="cpu", weights_only=True)
    p = torch.as_tensor(perm, dtype=torch.long)
    out = {}
    for k, v in state.items():
        if k == "W_enc":
            out[k] = v[:, p].clone()
        elif k == "W_dec":
            w = v[p].clone()
            g = torch.Generator().manual_seed(seed)
            out[k] = w + noise * w.norm(dim=1, keepdim=True) * torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5
        elif v.ndim == 1 and v.shape[0] == len(perm) and k != "b_dec":
            out[k] = v[p].clone()
        else:
            out[k] = v.clone()
    torch.save(out, dst / "weights.pt")
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def shared_demo_full(tmp_path_factory: Any, max_tokens: int = 1200) -> Path:
    """One demo full analysis per pytest session, shared by the feature test files (treat it as
    read-only: copy it before writing into it). Under pytest-xdist the workers share it too: it lives
    in the session's directory, and the first worker builds it while the others wait on a file lock."""
    from filelock import FileLock

    root = Path(tmp_path_factory.getbasetemp())
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above the workers' popen-gwK/
    base = root / f"shared_demo_full_{max_tokens}"
    with FileLock(f"{base}.lock"):
        if not (base / ".complete").is_file():
            if base.exists():
                shutil.rmtree(base)
            demo_full(base, max_tokens=max_tokens)
            (base / ".complete").write_text("")
    return base
