"""Analysis results and the metric naming scheme.

Metric names are ``<group>/<name>``; quick and full analysis use the same names, and the MLflow
run logs exactly the flat ``metrics`` dict (the results JSON holds the same numbers under
``metrics``). Groups:

- ``sparsity/``: l0_mean, l0_std, l1_mean, l1_std
- ``features/``: dead_count, dead_fraction, rare_count, rare_fraction, dense_count, dense_fraction,
  alive_count, train_dead_count (prior format only)
- ``recon/``: mse_per_token, mse_per_element, explained_variance, cosine, l2_ratio,
  relative_reconstruction_bias (full adds explained_variance_pooled)
- ``downstream/``: ce_clean, ce_sae, ce_zero, loss_recovered, kl_sae, kl_zero, kl_score
- ``tokens/``: analysed, predictions, windows, documents
- ``speed/``: tokens_per_s, seconds
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AnalysisResult:
    kind: str  # "quick" | "full"
    params: dict[str, Any]  # every input and resolved value (hook, topk mode, token count, versions)
    metrics: dict[str, float]  # flat, named as in the module docstring
    tags: dict[str, str] = field(default_factory=dict)  # lineage: source run, model name/version...
    per_feature: dict[str, list[float]] = field(default_factory=dict)  # e.g. firing_count, frequency
    details: dict[str, Any] = field(default_factory=dict)  # anything else worth writing (thresholds...)
    warnings: list[str] = field(default_factory=list)
    block_sums: Any = None  # sae_mlops.core.intervals.BlockSums: written as blocks.safetensors/json, not in the JSON

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-safe dict: NaN/inf become None."""
        return json_safe(
            {
                "kind": self.kind,
                "params": self.params,
                "metrics": self.metrics,
                "tags": self.tags,
                "details": self.details,
                "warnings": self.warnings,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        """The result a results JSON (`to_json_dict`) holds; ``per_feature`` is not in it (empty).
        KeyError / TypeError when `data` is not such a dict."""
        return cls(
            kind=str(data["kind"]),
            params=dict(data["params"]),
            metrics=dict(data["metrics"]),
            tags={str(k): str(v) for k, v in (data.get("tags") or {}).items()},
            details=dict(data.get("details") or {}),
            warnings=[str(w) for w in data.get("warnings") or []],
        )


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
