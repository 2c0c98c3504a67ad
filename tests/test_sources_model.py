"""Model loading: a local Hugging Face checkpoint (tiny random GPT-2) against HF logits, the demo,
and clear errors for unknown names and for the hub without network."""

from __future__ import annotations

import json

import pytest
import torch

from sae_mlops.errors import InputError
from sae_mlops.sources.model import load_model

VOCAB = ["<|endoftext|>"] + [f"w{i}" for i in range(63)]


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    """A tiny random GPT2LMHeadModel and a word-level tokenizer saved together. The directory name
    contains "llama", which TransformerLens would misread as the architecture if given the raw path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama-like-gpt2"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=VOCAB[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict.fromkeys(("bos_token", "eos_token", "pad_token", "unk_token"), VOCAB[0])
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=32, n_ctx=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_local_hf_checkpoint_matches_hf_logits(hf_gpt2_dir):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(hf_gpt2_dir))
    assert loaded.source == "hf_local" and loaded.name == str(hf_gpt2_dir)
    assert loaded.tokenizer is not None and loaded.model.tokenizer is not None
    assert loaded.model.cfg.model_name == "tiny-llama-like-gpt2"
    assert loaded.model.cfg.original_architecture == "GPT2LMHeadModel"
    hf = AutoModelForCausalLM.from_pretrained(str(hf_gpt2_dir), local_files_only=True).eval()
    ids = torch.randint(0, len(VOCAB), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = loaded.model(ids)
    # center_unembed (TransformerLens' default processing) shifts each position's logits by a constant
    torch.testing.assert_close(got.log_softmax(-1), ref.log_softmax(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got - got.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True), atol=1e-4, rtol=1e-4)
    assert loaded.model.to_tokens("w1 w2", prepend_bos=True).tolist() == [[0, 2, 3]]


def test_local_checkpoint_processing_can_be_switched_off(hf_gpt2_dir):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(hf_gpt2_dir), from_pretrained_kwargs={"center_unembed": False, "fold_ln": False})
    hf = AutoModelForCausalLM.from_pretrained(str(hf_gpt2_dir), local_files_only=True).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 4}))
    with pytest.raises(InputError, match=f"Model directory {tmp_path} is not a Hugging Face checkpoint"):
        load_model(str(tmp_path))


def test_unknown_model_name():
    with pytest.raises(
        InputError, match="Model 'gpt7-imaginary' is neither a local directory nor a TransformerLens model name"
    ):
        load_model("gpt7-imaginary")


def test_hub_model_without_network_is_an_input_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as info:
        load_model("gpt2")
    assert str(info.value) == (
        "Could not load model gpt2 from the Hugging Face hub (no network?); give a local checkpoint directory or 'demo'."
    )


def test_bad_dtype():
    with pytest.raises(InputError, match="dtype 'float8'"):
        load_model("demo", dtype="float8")


def test_demo_model(demo_assets):
    loaded = load_model("demo")
    assert loaded.source == "demo" and loaded.name == "demo" and loaded.tokenizer is not None
