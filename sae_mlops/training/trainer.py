"""SAELens's trainer with its metrics sent to a callback instead of Weights & Biases.

The seam (SAELens 6.54, ``sae_lens/training/sae_trainer.py``): ``SAETrainer.fit()`` loops

    sparsity_log = self.maybe_reset_sparsity()        # -> wandb.log(...) only if log_to_wandb
    step_output = self.step(next(self.data_provider))
    if self.cfg.logger.log_to_wandb:
        self._log_train_step(step_output)             # -> wandb.log(build_train_step_log_dict(...))
    ...
    self.n_training_steps += 1

``step()``, ``maybe_reset_sparsity()`` and ``build_train_step_log_dict()`` are the public seams
SAELens documents for external coordinators. :class:`MetricsSAETrainer` overrides ``step()`` to
call ``build_train_step_log_dict`` on the step's output — the same dictionary, at the same point of
the loop, that W&B logging would get — and ``maybe_reset_sparsity()`` to pass on the numeric part
of each feature-density window. With ``logger.log_to_wandb=False`` (which :func:`trainer_config`
forces) SAELens never calls ``wandb.init``/``wandb.log``; nothing else changes in its training loop
(optimizer, schedulers, dead-feature bookkeeping, TopK/BatchTopK/JumpReLU losses).

:class:`CallbackTrainingRunner` is SAELens's ``LanguageModelSAETrainingRunner`` (model, activation
store from a dataset, SAE built from its config, interruption handling, ``save_final_sae``) whose
``run()`` builds a :class:`MetricsSAETrainer` instead of the plain ``SAETrainer``; it mirrors the
upstream ``run()`` minus the W&B calls and the background prefetch.

Metric names sent (step = SAELens's ``n_training_steps``, starting at 0):
``train/loss`` (overall loss), ``train/mse`` (SAELens's ``losses/mse_loss``: squared error summed
over d_in, mean over tokens), ``train/l0``, ``train/dead_features`` (features silent for
``dead_feature_window`` steps), ``train/explained_variance``, ``train/lr``, and every other key of
SAELens's log dictionary as ``train/<key>`` (e.g. ``train/losses/auxiliary_reconstruction_loss``,
``train/sparsity/below_1e-5``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_mlops.training.baselines import BaselineState, after_step, apply_baseline

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]

RENAMES = {
    "losses/overall_loss": "train/loss",
    "losses/mse_loss": "train/mse",
    "metrics/l0": "train/l0",
    "sparsity/dead_features": "train/dead_features",
    "metrics/explained_variance": "train/explained_variance",
    "details/current_learning_rate": "train/lr",
}


def metric_name(key: str) -> str:
    """Our name for a key of SAELens's log dictionary."""
    return RENAMES.get(key, f"train/{key}")


def numeric(log_dict: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a SAELens log dictionary (histograms dropped), renamed."""
    out: dict[str, float] = {}
    for key, value in log_dict.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[metric_name(key)] = float(value)
    return out


class MetricsSAETrainer(SAETrainer):
    """``SAETrainer`` that reports each step's metrics to `on_metrics(step, metrics)` (see module doc)."""

    def __init__(
        self,
        *args: Any,
        on_metrics: MetricsCallback | None = None,
        log_every: int = 1,
        baseline: BaselineState | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.on_metrics = on_metrics
        self.log_every = max(1, int(log_every))
        self.last_metrics: dict[str, float] = {}
        self.baseline = baseline  # a random baseline's state (sae_mlops.training.baselines), or None

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        output = super().step(batch)
        after_step(self.sae, self.baseline)
        if self.n_training_steps % self.log_every == 0 or self.n_training_samples >= self.cfg.total_training_samples:
            with torch.no_grad():
                metrics = numeric(self.build_train_step_log_dict(output, self.n_training_samples))
            self.last_metrics = metrics
            if self.on_metrics is not None:
                self.on_metrics(self.n_training_steps, metrics)
        return output

    def maybe_reset_sparsity(self) -> dict[str, Any]:
        log_dict = super().maybe_reset_sparsity()
        if log_dict and self.on_metrics is not None:
            self.on_metrics(self.n_training_steps, numeric(log_dict))
        return log_dict


class CallbackTrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's training runner whose trainer is a :class:`MetricsSAETrainer` (see module doc)."""

    def __init__(
        self,
        *args: Any,
        on_metrics: MetricsCallback | None = None,
        log_every: int = 1,
        baseline: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.on_metrics = on_metrics
        self.log_every = log_every
        self.trainer: MetricsSAETrainer | None = None
        self.baseline_name = baseline
        self.baseline: BaselineState | None = None

    def run(self):  # noqa: D401 - mirrors LanguageModelSAETrainingRunner.run
        """Train and return the SAE (saved to ``cfg.output_path`` when set)."""
        if self.cfg.logger.log_to_wandb:
            raise ValueError("CallbackTrainingRunner sends metrics to its callback; set logger.log_to_wandb=False")
        self._set_sae_metadata()
        self.baseline = apply_baseline(self.sae, self.baseline_name)  # before the optimizer exists
        trainer = MetricsSAETrainer(
            cfg=self.cfg.to_sae_trainer_config(),
            sae=self.sae,
            data_provider=self.activations_store,
            evaluator=self.evaluator,
            save_checkpoint_fn=self.save_checkpoint,
            on_metrics=self.on_metrics,
            log_every=self.log_every,
            baseline=self.baseline,
        )
        self.trainer = trainer
        self._compile_sae_if_needed()
        sae = self._fit(trainer)
        if self.cfg.output_path is not None:
            self.save_final_sae(sae=sae, output_path=self.cfg.output_path, log_feature_sparsity=trainer.log_feature_sparsity)
        return sae

    def _fit(self, trainer: MetricsSAETrainer):
        """SAELens's interruption handling (it installs SIGINT/SIGTERM handlers, so only in the main
        thread), with the previous handlers restored afterwards."""
        if threading.current_thread() is not threading.main_thread():
            return trainer.fit()
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self.run_trainer_with_interruption_handling(trainer)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
