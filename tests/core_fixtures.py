"""Small, fast, offline fixtures for engine and metric tests: a random HookedTransformer with a
tiny byte-level BPE tokenizer, and random SAELens SAEs on its residual stream."""

from __future__ import annotations

import tempfile

import torch

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sparse autoencoders decompose activations into features.",
    "def add(a, b):\n    return a + b\n",
    "x",
    "Return the number of items in a container, counting nested ones twice.",
] * 4


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    # TransformerLens reloads the tokenizer by name_or_path, so it must live in a directory.
    from transformers import AutoTokenizer

    path = tempfile.mkdtemp(prefix="tiny_tok_")
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def tiny_model(n_layers: int = 2, d_model: int = 32, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=4, d_head=d_model // 4, d_mlp=4 * d_model, n_ctx=64,
        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=seed,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model, tokenizer


def random_standard_sae(d_in: int, d_sae: int, hook_name: str, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(-0.2, 0.1)
        sae.W_dec.copy_(sae.W_enc.T * 0.5)
        sae.b_dec.normal_(0, 0.05)
    return sae
