"""Train SAEs with SAELens on a model's activations, metrics going to a callback (MLflow via
`sae_mlops.tracking.training`). Nothing here imports mlflow.

- :class:`TrainConfig` (``config``): what to train on and how.
- :class:`MetricsSAETrainer` (``trainer``): SAELens's ``SAETrainer`` reporting each step's metrics
  to a callback; :func:`train_sae` (``run``): the SAELens training runner driven with it.
- :func:`train_and_log` (``run``): train and record the run, the SAE and its logged model in MLflow.
- :func:`train_seeds_and_log` (``run``): N seeds of one recipe as child runs of one parent run.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TrainConfig": "sae_mlops.training.config",
    "ARCHITECTURES": "sae_mlops.training.config",
    "MetricsSAETrainer": "sae_mlops.training.trainer",
    "train_sae": "sae_mlops.training.run",
    "train_and_log": "sae_mlops.training.run",
    "train_seeds_and_log": "sae_mlops.training.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
