"""The collector protocol and what the engine hands to collectors each batch.

A collector is a streaming metric in the torchmetrics shape: ``update(step)`` folds one batch in,
``merge(other)`` folds in another collector of the same kind (a shard of the corpus), ``compute()``
returns finished numbers. Collectors never run the model; they only reduce what the engine gives them.
All running sums are float64 on the CPU so that averages are exact token averages.

Each collector derives from :class:`sae_mlops.core.collectors.state.StateCollector` and declares its
state once (``add_state(name, default, reduce)``, reduce sum / max / min / cat / top-k), so that
``state_dict()``, ``load_state_dict()``, ``merge()`` and the files of ``save_states`` /
``load_states`` (safetensors + JSON, no pickle) are generic; ``sync()`` folds buffers into the state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from sae_mlops.core.tokens import TokenBatch

T = TypeVar("T")


@dataclass
class SparseCodes:
    """The non-zero entries of a batch's codes f [n, d_sae], on the CPU, in row-major order
    (sorted by row, then feature): ``f[rows[j], cols[j]] == values[j]``."""

    rows: torch.Tensor  # [nnz] int64
    cols: torch.Tensor  # [nnz] int64
    values: torch.Tensor  # [nnz] float32

    @classmethod
    def from_dense(cls, f: torch.Tensor) -> "SparseCodes":
        rows, cols = f.nonzero(as_tuple=True)
        values = f[rows, cols].float()
        return cls(rows.cpu(), cols.cpu(), values.cpu())


@dataclass
class StepData:
    """One batch after the engine's work. Rows of x/f/x_hat are the analysed positions of
    ``batch`` in row-major order (``batch.analysed`` flattened)."""

    batch: TokenBatch
    x: torch.Tensor  # [n, d_in] hook activations (float32)
    f: torch.Tensor  # [n, d_sae] SAE feature activations
    x_hat: torch.Tensor  # [n, d_in] SAE reconstructions
    ce_clean: torch.Tensor | None = None  # [n_pred] next-token CE (nats) at batch.predicts
    ce_sae: torch.Tensor | None = None
    ce_zero: torch.Tensor | None = None
    kl_sae: torch.Tensor | None = None  # [n] KL(p_clean || p_sae) (nats) at batch.analysed
    kl_zero: torch.Tensor | None = None
    token_start: int = 0  # global index (stream order) of the first analysed token of this batch
    _sparse: SparseCodes | None = field(default=None, repr=False)
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per batch under ``key``, then the same value: per-token terms that
        several collectors sum (L0 and L1, the reconstruction terms) are computed by the first
        collector that needs them. The value is shared, so callers must not modify it in place."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    @property
    def sparse(self) -> SparseCodes:
        """The non-zero codes, found once per batch and shared by every collector (one scan of
        the dense [n, d_sae] codes instead of one per collector)."""
        if self._sparse is None:
            self._sparse = SparseCodes.from_dense(self.f)
        return self._sparse

    @property
    def token_index(self) -> torch.Tensor:
        """[n] global token indices of the analysed rows, in stream order."""
        return torch.arange(self.token_start, self.token_start + self.x.shape[0])


class Collector(Protocol):
    """What the engine calls. The analysis collectors are also
    :class:`~sae_mlops.core.collectors.state.StateCollector` (declared, mergeable state); a sink such
    as the activation-database writer need not be."""

    name: str

    def update(self, step: StepData) -> None: ...

    def merge(self, other: Any) -> None: ...  # another collector of the same class

    def compute(self) -> dict[str, Any]: ...


def f64sum(t: torch.Tensor) -> float:
    """Sum of a tensor accumulated in float64, as a Python float."""
    return float(t.sum(dtype=torch.float64))
