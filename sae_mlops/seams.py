"""What sae-mlops relies on in its dependencies, beyond their documented top-level API.

``pyproject.toml`` pins sae-lens, transformer-lens and mlflow to the minor versions tested. When one of
them is upgraded anyway, :func:`check_seams` names each seam that moved, with what we use it for, so
the failure reads "SAELens trainer seam: ... has no ``_set_sae_metadata``" instead of an
AttributeError deep in a training run. ``tests/test_dependency_seams.py`` runs it in CI;
``python -m sae_mlops.seams`` runs it by hand (exit 1 when something moved).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seam:
    """One thing we use: ``module:attribute`` (dotted attribute path), and why.

    calls: names that must appear in the attribute's source (for a method whose body we mirror).
    """

    name: str
    target: str
    why: str
    calls: tuple[str, ...] = ()


SEAMS: tuple[Seam, ...] = (
    Seam("SAELens trainer seam", "sae_lens.training.sae_trainer:SAETrainer.step",
         "MetricsSAETrainer overrides step() to send each step's metrics to MLflow"),
    Seam("SAELens trainer seam", "sae_lens.training.sae_trainer:SAETrainer.build_train_step_log_dict",
         "the per-step metrics dictionary W&B would get"),
    Seam("SAELens trainer seam", "sae_lens.training.sae_trainer:SAETrainer.maybe_reset_sparsity",
         "feature-density windows"),
    Seam("SAELens runner seam (private)", "sae_lens.llm_sae_training_runner:LanguageModelSAETrainingRunner.run",
         "CallbackTrainingRunner.run mirrors it with a MetricsSAETrainer; it must still make these calls",
         calls=("_set_sae_metadata", "SAETrainer(", "_compile_sae_if_needed", "save_final_sae")),
    Seam("SAELens runner seam (private)",
         "sae_lens.llm_sae_training_runner:LanguageModelSAETrainingRunner._set_sae_metadata",
         "called by CallbackTrainingRunner.run as upstream run() does"),
    Seam("SAELens runner seam (private)",
         "sae_lens.llm_sae_training_runner:LanguageModelSAETrainingRunner._compile_sae_if_needed",
         "called by CallbackTrainingRunner.run as upstream run() does"),
    Seam("SAELens runner seam", "sae_lens.llm_sae_training_runner:LanguageModelSAETrainingRunner.save_final_sae",
         "writes the trained SAE"),
    Seam("SAELens runner seam",
         "sae_lens.llm_sae_training_runner:LanguageModelSAETrainingRunner.run_trainer_with_interruption_handling",
         "SIGINT/SIGTERM during training"),
    Seam("SAELens architecture registry", "sae_lens.registry:SAE_CLASS_REGISTRY",
         "SAELens directories of any registered architecture"),
    Seam("SAELens special tokens", "sae_lens.util:get_special_token_ids", "which tokens are not analysed"),
    Seam("TransformerLens soft cap", "transformer_lens.utilities:softcap_enabled", "the engine's unembedding"),
    Seam("TransformerLens post-norm list", "transformer_lens.utilities.architectures:POST_NORM_ARCHITECTURES",
         "whether a hook has a linear path to the logits (logit lens)"),
    Seam("TransformerLens model names", "transformer_lens.loading_from_pretrained:get_official_model_name",
         "model names recorded in SAE metadata"),
    Seam("MLflow model-name rule (private)", "mlflow.utils.validation:_validate_model_name",
         "--register NAME is checked before training; MLflow has no public validator"),
    Seam("MLflow value limits", "mlflow.utils.validation:MAX_PARAM_VAL_LENGTH", "long param values are cut to fit"),
    Seam("MLflow value limits", "mlflow.utils.validation:MAX_TAG_VAL_LENGTH", "long tag values are cut to fit"),
    Seam("MLflow run context tags (internal)", "mlflow.tracking.context.registry:resolve_tags",
         "user, source and git tags on runs created with an explicit start time (mlflow.start_run has no "
         "start_time, and the run's start must be when the analysis started)"),
)


def _resolve(target: str) -> object:
    module_name, _, path = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def check_seams(seams: tuple[Seam, ...] = SEAMS) -> list[str]:
    """One sentence per seam that is missing or changed in the installed versions (empty: all hold)."""
    problems = []
    for seam in seams:
        try:
            obj = _resolve(seam.target)
        except (ImportError, AttributeError) as e:
            problems.append(f"{seam.name}: {seam.target} is gone in the installed version ({e}); used for: {seam.why}.")
            continue
        if seam.calls:
            source = inspect.getsource(obj)  # type: ignore[arg-type]
            missing = [c for c in seam.calls if c not in source]
            if missing:
                problems.append(
                    f"{seam.name}: {seam.target} no longer calls {', '.join(missing)}; used for: {seam.why}."
                )
    return problems


def main() -> int:
    problems = check_seams()
    for p in problems:
        log.error("%s", p)
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
