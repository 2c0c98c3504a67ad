"""Demo SAE in SAELens format, trained by SAELens's own `SAETrainer` on the demo model's activations."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _activation_batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of `acts` (SAELens's `DataProvider`)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(acts) - batch_size + 1, batch_size):
            yield acts[perm[start : start + batch_size]]


def train_saelens_topk(
    train_acts: torch.Tensor,
    out_dir: Path,
    *,
    hook_name: str,
    model_name: str,
    context_size: int,
    d_sae: int,
    k: int = 16,
    epochs: int = 5,
    batch_size: int = 2048,
    lr: float = 3e-3,
    seed: int = 0,
) -> None:
    """Train a SAELens TopK SAE on activations [n, d_in] with `SAETrainer` (W&B off) and save its
    inference form (`cfg.json` + `sae_weights.safetensors`) to `out_dir`.

    The metadata records the hook, model name, context size and prepend_bos=True, as a SAELens
    training run on this model would.
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    metadata = SAEMetadata(
        model_name=model_name,
        hook_name=hook_name,
        hook_head_index=None,
        context_size=context_size,
        prepend_bos=True,
        seqpos_slice=(None,),
        model_from_pretrained_kwargs={},
        exclude_special_tokens=True,
    )
    sae_cfg = TopKTrainingSAEConfig(
        d_in=train_acts.shape[1], d_sae=d_sae, k=k, dtype="float32", device="cpu", metadata=metadata
    )
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_dec.copy_(train_acts.median(dim=0).values)
    total = epochs * (len(train_acts) // batch_size) * batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=total // batch_size // 20,
        device="cpu",
        dead_feature_window=200,
        feature_sampling_window=500,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_activation_batches(train_acts, batch_size, seed))
    trained = trainer.fit()
    _, cfg_path = trained.save_inference_model(out_dir)
    # SAELens builds this dict from a set of field names: sort the keys so rebuilds are byte-identical.
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text(encoding="utf-8")), sort_keys=True), encoding="utf-8")
    logger.info("SAELens TopK SAE (k=%d, d_sae=%d) saved to %s", k, d_sae, out_dir)
