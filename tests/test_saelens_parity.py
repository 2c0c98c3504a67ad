"""Our streaming metrics agree with SAELens 6.54 ``run_evals`` on the same tokens."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler

from core_fixtures import random_standard_sae, tiny_model
from sae_mlops.core.collectors.downstream import DownstreamCollector
from sae_mlops.core.collectors.reconstruction import ReconstructionCollector
from sae_mlops.core.collectors.sparsity import SparsityCollector
from sae_mlops.core.engine import Engine, HookSite
from sae_mlops.core.tokens import Window, collate, make_plan


class FixedTokenStore:
    """The part of SAELens's ActivationsStore that run_evals uses, serving fixed token batches."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches
        self.i = 0
        self.store_batch_size_prompts = batches[0].shape[0]
        self.context_size = batches[0].shape[1]

    def get_batch_tokens(self, n: int) -> torch.Tensor:  # noqa: ARG002
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def reset_input_dataset(self) -> None:
        self.i = 0


def _token_batches(tokenizer, n_batches: int, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        t = torch.randint(0, len(tokenizer), (batch, length), generator=g)
        t[:, 0] = tokenizer.bos_token_id
        t[1, 5] = tokenizer.eos_token_id  # a special token mid-window must be excluded everywhere
        out.append(t)
    return out


def _ours(model, sae, hook, batches, tokenizer):
    plan = make_plan(tokenizer, batches[0].shape[1], True)
    engine = Engine(model, sae, HookSite.for_model(model, hook))
    collectors = [SparsityCollector(sae.cfg.d_sae), ReconstructionCollector(sae.cfg.d_in), DownstreamCollector()]
    tb = [collate([Window(i, 0, row.tolist(), True) for i, row in enumerate(b)], plan) for b in batches]
    engine.run(tb, collectors, progress=False)
    metrics = {}
    for c in collectors:
        metrics.update(c.compute())
    return metrics


def _theirs(model, sae, batches):
    cfg = EvalConfig(
        n_eval_reconstruction_batches=len(batches),
        n_eval_sparsity_variance_batches=len(batches),
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(sae, FixedTokenStore(batches), model, ActivationScaler(), cfg)
    return metrics


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
@pytest.mark.parametrize("n_batches", [1, 3])
def test_metrics_match_run_evals(hook, n_batches):
    model, tokenizer = tiny_model()
    sae = random_standard_sae(model.cfg.d_model, 96, hook)
    batches = _token_batches(tokenizer, n_batches, batch=6, length=24, seed=n_batches)
    ours = _ours(model, sae, hook, batches, tokenizer)
    theirs = _theirs(model, sae, batches)

    pairs = {
        "sparsity/l0_mean": theirs["sparsity"]["l0"],
        "sparsity/l1_mean": theirs["sparsity"]["l1"],
        "recon/mse_per_token": theirs["reconstruction_quality"]["mse"],
        "recon/cosine": theirs["reconstruction_quality"]["cossim"],
        "recon/explained_variance": theirs["reconstruction_quality"]["explained_variance"],
        "recon/l2_ratio": theirs["shrinkage"]["l2_ratio"],
        "downstream/ce_clean": theirs["model_performance_preservation"]["ce_loss_without_sae"],
        "downstream/ce_sae": theirs["model_performance_preservation"]["ce_loss_with_sae"],
        "downstream/ce_zero": theirs["model_performance_preservation"]["ce_loss_with_ablation"],
        "downstream/kl_sae": theirs["model_behavior_preservation"]["kl_div_with_sae"],
        "downstream/kl_zero": theirs["model_behavior_preservation"]["kl_div_with_ablation"],
        "downstream/kl_score": theirs["model_behavior_preservation"]["kl_div_score"],
    }
    if n_batches == 1:  # SAELens averages this ratio per batch; one batch makes the two equal
        pairs["recon/relative_reconstruction_bias"] = theirs["shrinkage"]["relative_reconstruction_bias"]
    # the metric registry names the same SAELens keys (it is what people read as "SAELens equivalent")
    from sae_mlops.metrics import METRICS

    registry = {m.name: m.saelens.split("/") for m in METRICS if m.saelens}
    for name, ref in pairs.items():
        group, key = registry[name]
        assert theirs[group][key] == ref, name
    assert set(registry) - set(pairs) <= {"downstream/loss_recovered", "recon/relative_reconstruction_bias"}
    for name, ref in pairs.items():
        assert ours[name] == pytest.approx(ref, rel=2e-4, abs=1e-5), name
    score = theirs["model_performance_preservation"]["ce_loss_score"]
    if ours["downstream/ce_zero"] > ours["downstream/ce_clean"]:
        assert ours["downstream/loss_recovered"] == pytest.approx(score, rel=2e-4)
    else:
        assert math.isnan(ours["downstream/loss_recovered"])
