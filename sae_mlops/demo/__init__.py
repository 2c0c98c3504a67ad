"""The embedded, fully offline demo: a stdlib-docstring corpus, a small HookedTransformer with its
tokenizer, and three SAEs on `blocks.0.hook_resid_post` (see `assets/README.md`)."""

from sae_mlops.demo.assets import (
    ASSETS_DIR,
    HOOK_NAME,
    SAE_KINDS,
    demo_corpus_path,
    demo_model_dir,
    demo_sae_path,
    demo_tokenizer_dir,
    ensure_demo_assets,
    load_demo_model,
    load_demo_tokenizer,
)

__all__ = [
    "ASSETS_DIR",
    "HOOK_NAME",
    "SAE_KINDS",
    "demo_corpus_path",
    "demo_model_dir",
    "demo_sae_path",
    "demo_tokenizer_dir",
    "ensure_demo_assets",
    "load_demo_model",
    "load_demo_tokenizer",
]
