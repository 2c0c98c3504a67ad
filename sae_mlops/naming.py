"""Short, readable names for SAEs, runs and logged models (what a researcher sees in the MLflow UI).

- :func:`sae_name`: what the user called the SAE, shortened: a local directory -> its name
  (``.../demo_saes/topk_512`` -> ``topk_512``); ``models:/demo-sae@champion`` -> ``demo-sae@champion``;
  ``models:/demo-sae/3`` -> ``demo-sae/v3``; ``models:/m-<id>`` -> ``m-<first 8 hex>``;
  ``runs:/<id>/sae`` -> ``run-<first 8 hex>/sae``; a SAELens release with an id -> ``<release>/<id>``.
- :func:`run_title`: ``<kind> · <sae name> · <architecture> d<d_sae> k<k>`` (``k`` only when the SAE
  has one), e.g. ``full · topk_512 · topk d512 k16``.
- :func:`model_name`: a LoggedModel name from the SAE name (letters, digits, ``.``, ``_``, ``-``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SEP = " · "


def sae_name(sae: str, sae_id: str | None = None) -> str:
    """A short name for the SAE the user named (see the module docstring)."""
    s = str(sae).strip().rstrip("/\\")
    if s.startswith("models:/"):
        rest = s[len("models:/") :].strip("/")
        if rest.startswith("m-"):
            name = rest[:10]
        elif "@" in rest:
            name = rest
        else:
            parts = rest.split("/")
            name = f"{parts[0]}/v{parts[1]}" if len(parts) > 1 and parts[1].isdigit() else rest
    elif s.startswith("runs:/"):
        parts = s[len("runs:/") :].strip("/").split("/", 1)
        name = f"run-{parts[0][:8]}" + (f"/{parts[1]}" if len(parts) > 1 and parts[1] else "")
    elif "://" in s:
        name = s.split("://", 1)[1].rstrip("/").rsplit("/", 1)[-1] or s
    else:
        name = Path(s).name or s
    if sae_id:
        name = f"{name}/{sae_id}"
    return name[:80]


def run_title(kind: str, name: str | None, architecture: Any = None, d_sae: Any = None, k: Any = None) -> str:
    """``<kind> · <sae name> · <architecture> d<d_sae> k<k>`` with the absent parts left out."""
    shape = " ".join(
        p for p in (
            str(architecture) if architecture else "",
            f"d{int(d_sae)}" if _is_num(d_sae) else "",
            f"k{int(k)}" if _is_num(k) else "",
        ) if p
    )
    return SEP.join(p for p in (kind, name or "", shape) if p)[:250]


def model_name(name: str | None, default: str = "sae") -> str:
    """A LoggedModel name made from `name`: letters, digits, ``_`` and ``-`` kept, every other run of
    characters (dots included: MLflow refuses ``/ : . % " '`` in model names) becomes ``_``;
    `default` when empty."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name or "")).strip("_")
    return cleaned[:100] or default


def _is_num(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def utc_timestamp() -> str:
    """Now in UTC as ``YYYYmmddTHHMMSSZ``: the suffix of default output directories (``quick_<ts>``)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
