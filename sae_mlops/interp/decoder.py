"""The SAE's decoder rows for an analysis, when the SAE can still be loaded (optional).

The results JSON records the SAE source (param ``sae``, with ``sae_id`` for releases) and its
content hash (``sae_hash``). The decoder is used only when the source still loads and, where both
hashes are known, still has that hash: decoder norms and PCA of another SAE would mislead.
"""

from __future__ import annotations

import logging

import numpy as np

from sae_mlops.interp.data import AnalysisData

log = logging.getLogger(__name__)


def load_decoder(data: AnalysisData, source: str | None = None, attach: bool = True) -> np.ndarray | None:
    """``W_dec [d_sae, d_in]`` as float32 numpy, or None (logged) when it cannot be had.

    source: the SAE to load (default: the analysis's recorded ``sae`` param).
    attach: also set ``data.decoder`` (then similarity falls back to it when no dense matrix exists).
    """
    src = source or data.params.get("sae")
    if not src:
        log.warning("the analysis records no SAE source; decoder views are skipped")
        return None
    try:
        import sae_mlops.tracking.resolve  # noqa: F401 (resolves runs:/ and models:/ SAE URIs)
        from sae_mlops.sources.sae import load_sae

        loaded = load_sae(str(src), sae_id=data.params.get("sae_id") or None, device="cpu", topk_mode=data.params.get("topk_mode") or None)
    except Exception as e:  # any failure only drops the optional decoder views
        log.warning("could not load the SAE '%s' for decoder views (%s); they are skipped", src, " ".join(str(e).split()))
        return None
    want, got = data.params.get("sae_hash"), loaded.info.content_hash
    if want and got and want != got:
        log.warning("the SAE at '%s' has changed since the analysis (hash %s, recorded %s); decoder views are skipped", src, got[:12], str(want)[:12])
        return None
    w = loaded.module.W_dec.detach().float().cpu().numpy()
    if w.shape[0] != data.d_sae:
        log.warning("the SAE at '%s' has %d features, the analysis %d; decoder views are skipped", src, w.shape[0], data.d_sae)
        return None
    if attach:
        data.decoder = w
    return w
