"""Where the embedded demo assets live, and how to load them offline.

Layout of `ASSETS_DIR` (rebuilt by `python scripts/build_demo_assets.py`):

- `corpus.json`: JSON list[str], docstrings of the Python standard library
- `model/config.json`, `model/model.safetensors`: a 2-layer HookedTransformer (config = the
  HookedTransformerConfig arguments); `model/tokenizer/`: its Hugging Face tokenizer
- `sae_standard/`, `sae_batchtopk/`: SAEs in the prior tool's format on `blocks.0.hook_resid_post`
- `sae_saelens/`: a SAELens TopK SAE (cfg.json + sae_weights.safetensors) on the same hook
- `build_info.json`: what the build measured (losses, SAE statistics on held-out windows)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sae_mlops.errors import InputError

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
HOOK_NAME = "blocks.0.hook_resid_post"
SAE_KINDS = ("standard", "batchtopk", "saelens")

_SAE_FILES = {
    "standard": ("config.json", "weights.pt", "history.json"),
    "batchtopk": ("config.json", "weights.pt", "history.json"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def demo_corpus_path(assets_dir: Path = ASSETS_DIR) -> Path:
    """The demo corpus (JSON list[str])."""
    return assets_dir / "corpus.json"


def demo_model_dir(assets_dir: Path = ASSETS_DIR) -> Path:
    """The demo model directory (config.json, model.safetensors, tokenizer/)."""
    return assets_dir / "model"


def demo_tokenizer_dir(assets_dir: Path = ASSETS_DIR) -> Path:
    """The demo tokenizer directory (loadable with `transformers.AutoTokenizer.from_pretrained`)."""
    return demo_model_dir(assets_dir) / "tokenizer"


def demo_sae_path(kind: str, assets_dir: Path = ASSETS_DIR) -> Path:
    """The directory of the demo SAE of `kind`: "standard" or "batchtopk" (prior tool's format) or
    "saelens" (SAELens format)."""
    if kind not in SAE_KINDS:
        raise InputError(f"Unknown demo SAE kind {kind!r}: use one of {', '.join(SAE_KINDS)}.")
    return assets_dir / f"sae_{kind}"


def required_files(assets_dir: Path = ASSETS_DIR) -> list[Path]:
    """Every file the demo needs."""
    model_dir = demo_model_dir(assets_dir)
    files = [demo_corpus_path(assets_dir), model_dir / "config.json", model_dir / "model.safetensors"]
    files += [demo_tokenizer_dir(assets_dir) / name for name in _TOKENIZER_FILES]
    for kind, names in _SAE_FILES.items():
        files += [demo_sae_path(kind, assets_dir) / name for name in names]
    return files


def ensure_demo_assets(force: bool = False, assets_dir: Path = ASSETS_DIR) -> Path:
    """Return `assets_dir`, rebuilding the assets first if any file is missing (or `force`).

    A rebuild takes a few minutes on a laptop CPU and logs its progress.
    """
    missing = [p for p in required_files(assets_dir) if not p.is_file()]
    if missing or force:
        if missing:
            logger.warning("demo assets incomplete (%s missing): rebuilding them in %s", missing[0], assets_dir)
        from sae_mlops.demo.build import build_demo_assets

        build_demo_assets(assets_dir)
    return assets_dir


def load_demo_tokenizer(assets_dir: Path = ASSETS_DIR) -> Any:
    """The demo tokenizer (a `PreTrainedTokenizerFast`); `<|endoftext|>` is BOS, EOS, PAD and UNK."""
    from sae_mlops.demo.tokenizer import load_tokenizer

    return load_tokenizer(demo_tokenizer_dir(assets_dir))


def load_demo_model(device: str = "cpu", assets_dir: Path = ASSETS_DIR) -> tuple[Any, Any]:
    """The demo HookedTransformer (eval mode, `cfg.default_prepend_bos=True`) and its tokenizer,
    rebuilt offline from the assets (built first if missing).

    The returned tokenizer adds no special tokens (`tokenizer(text)` gives the text's tokens only);
    `model.to_tokens(text)` prepends BOS.
    """
    from sae_mlops.demo.lm import load_model

    ensure_demo_assets(assets_dir=assets_dir)
    tokenizer = load_demo_tokenizer(assets_dir)
    return load_model(demo_model_dir(assets_dir), tokenizer, device=device), tokenizer
