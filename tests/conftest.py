"""Shared pytest fixtures. Each section belongs to one part of the package; keep them small."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

# ---------------------------------------------------------------------------------------------
# sources layer (tests/test_sources_*.py): tiny SAE directories in both formats, an MLflow store
# ---------------------------------------------------------------------------------------------

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="session")
def make_legacy_sae(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory writing a prior-format SAE directory (config.json, weights.pt, history.json) with
    random weights in a fresh temporary directory; returns its path. `config` entries override
    config.json, `weights` entries override weights.pt."""

    def make(
        name: str = "legacy",
        d_in: int = 8,
        d_sae: int = 16,
        top_k: int | None = None,
        seed: int = 0,
        history: bool = True,
        weights: dict[str, Any] | None = None,
        **config: Any,
    ) -> Path:
        gen = torch.Generator().manual_seed(seed)
        state = {
            "W_enc": torch.randn(d_in, d_sae, generator=gen) * 0.5,
            "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
            "W_dec": torch.randn(d_sae, d_in, generator=gen) * 0.5,
            "b_dec": torch.randn(d_in, generator=gen) * 0.1,
            "ever_fired": torch.rand(d_sae, generator=gen) > 0.3,
        }
        if top_k is not None:
            state["num_batches_not_active"] = torch.zeros(d_sae)
        state.update(weights or {})
        cfg = {
            "d_in": d_in,
            "d_sae": d_sae,
            "l1_coefficient": 0.01,
            "dtype": "float32",
            "device": "cpu",
            "hook_layer": "0",
            "hook_name": "hook_resid_post",
            "hook_spec": HOOK,
            "top_k": top_k,
            "top_k_aux": 4,
            "n_batches_to_dead": 5,
            "aux_penalty": 0.03,
        }
        cfg.update(config)
        path = tmp_path_factory.mktemp("legacy_sae") / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(cfg))
        torch.save(state, path / "weights.pt")
        if history:
            (path / "history.json").write_text(
                json.dumps({"loss": [3.0, 2.0], "sparsity": [40.0, 20.0], "val_loss": [3.1, 2.2]})
            )
        return path

    return make


@pytest.fixture(scope="session")
def make_saelens_sae(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory writing a SAELens directory with `save_model` for architecture "standard", "topk" or
    "jumprelu" (random weights) in a fresh temporary directory; returns its path."""

    def make(
        architecture: str = "standard",
        name: str | None = None,
        d_in: int = 8,
        d_sae: int = 16,
        hook_name: str = HOOK,
        model_name: str | None = "demo",
        seed: int = 0,
        **kwargs: Any,
    ) -> Path:
        import sae_lens
        from sae_lens.saes.sae import SAEMetadata

        classes = {
            "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
            "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
            "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        }
        sae_cls, cfg_cls = classes[architecture]
        metadata = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True, context_size=32)
        sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=metadata, **kwargs))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in sae.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            if architecture == "jumprelu":
                sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.3)
        path = tmp_path_factory.mktemp("saelens_sae") / (name or f"saelens_{architecture}")
        sae.save_model(path)
        return path

    return make


@pytest.fixture
def demo_assets() -> None:
    """Skip unless the demo assets are built (never trigger a multi-minute build from a test)."""
    try:
        from sae_mlops.demo.assets import required_files
    except ImportError:
        pytest.skip("sae_mlops.demo is not available")
    if not all(path.is_file() for path in required_files()):
        pytest.skip("demo assets not built (python scripts/build_demo_assets.py)")


@contextmanager
def _mlflow_store_at(root: Path) -> Iterator[str]:
    """A fresh sqlite MLflow store in `root` as the current tracking URI, restored on exit."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the default artifact root (./mlruns) is resolved against the cwd
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI"):
            mp.delenv(var, raising=False)
        mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
        mp.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
        try:
            yield uri
        finally:
            while mlflow.active_run():
                mlflow.end_run()


@pytest.fixture(scope="session")
def mlflow_store_at() -> Callable[[Path], Any]:
    """Context-manager factory for a sqlite MLflow store in a given directory (any fixture scope)."""
    return _mlflow_store_at


@pytest.fixture
def mlflow_store(tmp_path: Path) -> Iterator[str]:
    """A fresh sqlite MLflow store in tmp_path as the current tracking URI (restored afterwards)."""
    with _mlflow_store_at(tmp_path) as uri:
        yield uri
