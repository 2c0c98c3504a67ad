"""check_compatible: hook existence, hook width (incl. per-head hooks), tokenizer, model-name warning."""

from __future__ import annotations

import pytest
import torch
from core_fixtures import tiny_model

from sae_mlops.errors import InputError
from sae_mlops.sources.sae import load_sae
from sae_mlops.sources.types import LoadedModel, LoadedSAE, SAEInfo
from sae_mlops.sources.validate import check_compatible, hook_width


@pytest.fixture(scope="module")
def tiny():
    """LoadedModel around a random 2-layer HookedTransformer (d_model 32, 4 heads of 8)."""
    model, tokenizer = tiny_model()
    return LoadedModel(model=model, name="tiny", tokenizer=tokenizer, source="transformer_lens")


def sae(hook="blocks.0.hook_resid_post", d_in=32, model_name="tiny", head=None) -> LoadedSAE:
    info = SAEInfo(
        source="test-sae",
        format="saelens",
        architecture="standard",
        hook_name=hook,
        d_in=d_in,
        d_sae=64,
        model_name=model_name,
        hook_head_index=head,
    )
    return LoadedSAE(module=torch.nn.Identity(), info=info)


def test_compatible_without_warnings(tiny, make_saelens_sae):
    loaded = load_sae(str(make_saelens_sae(d_in=32, d_sae=64, model_name="tiny")))
    assert check_compatible(loaded, tiny) == []


@pytest.mark.parametrize(
    ("hook", "width", "head"),
    [
        ("blocks.1.hook_resid_post", 32, None),
        ("blocks.0.mlp.hook_post", 128, None),
        ("blocks.1.attn.hook_z", 32, None),  # 4 heads x 8, flattened
        ("blocks.1.attn.hook_z", 8, 2),  # one head
        ("hook_embed", 32, None),
        ("ln_final.hook_normalized", 32, None),
    ],
)
def test_hook_width(tiny, hook, width, head):
    assert hook_width(tiny.model, hook, head) == width
    assert check_compatible(sae(hook=hook, d_in=width, head=head), tiny) == []


def test_unknown_hook_lists_valid_names(tiny):
    with pytest.raises(InputError) as info:
        check_compatible(sae(hook="blocks.0.hook_resid_postt"), tiny)
    message = str(info.value)
    assert "Hook blocks.0.hook_resid_postt (from the SAE test-sae) is not a hook of model tiny" in message
    assert "blocks.0.hook_resid_post" in message.split("valid hooks include", 1)[1]


def test_hook_override(tiny):
    with pytest.raises(InputError, match="Hook blocks.9.hook_resid_post \\(from --hook\\)"):
        check_compatible(sae(), tiny, hook_override="blocks.9.hook_resid_post")
    warnings = check_compatible(sae(), tiny, hook_override="blocks.1.hook_resid_pre")
    assert warnings == [
        "Using hook blocks.1.hook_resid_pre instead of the SAE's recorded hook blocks.0.hook_resid_post."
    ]


def test_wrong_d_in_names_both_widths(tiny):
    with pytest.raises(InputError) as info:
        check_compatible(sae(d_in=16, model_name="gpt2"), tiny)
    message = str(info.value)
    assert "SAE test-sae has d_in=16 but hook blocks.0.hook_resid_post of model tiny has width 32" in message
    assert "records model gpt2" in message


def test_head_index_out_of_range(tiny):
    with pytest.raises(InputError, match="reads head 7 .* 4 heads"):
        check_compatible(sae(hook="blocks.0.attn.hook_z", d_in=8, head=7), tiny)


def test_model_name_warning(tiny):
    warnings = check_compatible(sae(model_name="gpt2"), tiny)
    assert warnings == ["The SAE was trained on model gpt2 but the model given is tiny; results may be meaningless."]
    assert check_compatible(sae(model_name=None), tiny) == []
    assert check_compatible(sae(model_name="TINY"), tiny) == []


def test_model_name_aliases_match(tiny):
    """TransformerLens aliases count as the same model (gpt2-small is gpt2)."""
    aliased = LoadedModel(model=tiny.model, name="gpt2-small", tokenizer=tiny.tokenizer, source="transformer_lens")
    assert check_compatible(sae(model_name="gpt2"), aliased) == []
    assert check_compatible(sae(model_name="openai-community/gpt2"), aliased) == []  # org prefix tolerated
    assert len(check_compatible(sae(model_name="pythia-70m"), aliased)) == 1


def test_demo_name_is_consistent(tiny):
    demo = LoadedModel(model=tiny.model, name="demo", tokenizer=tiny.tokenizer, source="demo")
    assert check_compatible(sae(model_name="demo"), demo) == []
    assert len(check_compatible(sae(model_name="gpt2"), demo)) == 1
    assert len(check_compatible(sae(model_name="demo"), tiny)) == 1


def test_missing_tokenizer(tiny):
    from transformer_lens import HookedTransformer

    bare = HookedTransformer(tiny.model.cfg)  # no tokenizer
    loaded = LoadedModel(model=bare, name="bare", tokenizer=None, source="transformer_lens")
    with pytest.raises(InputError, match="Model bare has no tokenizer"):
        check_compatible(sae(), loaded)


def test_prepare_loads_the_model_as_the_sae_was_trained(monkeypatch):
    """SAELens's recorded model_from_pretrained_kwargs reach the model loader."""
    import sae_mlops.sources.model as model_mod
    from sae_mlops.analyses.quick import prepare
    from sae_mlops.config import AnalysisConfig
    from sae_mlops.demo import demo_sae_path
    from sae_mlops.sources import sae as sae_mod

    real_load_sae, real_load_model = sae_mod.load_sae, model_mod.load_model
    seen = {}

    def load_sae(*args, **kwargs):
        loaded = real_load_sae(*args, **kwargs)
        loaded.info.extra["model_from_pretrained_kwargs"] = {"center_writing_weights": False}
        return loaded

    def load_model(name, **kwargs):
        seen.update(kwargs)
        return real_load_model(name, **kwargs)

    monkeypatch.setattr(sae_mod, "load_sae", load_sae)
    monkeypatch.setattr(model_mod, "load_model", load_model)
    prepare(AnalysisConfig(sae=str(demo_sae_path("saelens")), model="demo", progress=False))
    assert seen["from_pretrained_kwargs"] == {"center_writing_weights": False}


def _named(name: str, architecture: str | None) -> LoadedModel:
    from types import SimpleNamespace

    cfg = SimpleNamespace(original_architecture=architecture, model_name=name.rsplit("/", 1)[-1])
    return LoadedModel(model=SimpleNamespace(cfg=cfg), name=name, tokenizer=None, source="hf_local")


def test_a_local_copy_of_the_recorded_architecture_does_not_warn():
    """A folder of another name whose architecture is the recorded model's family (and whose width the
    width check has already matched) is taken to be that model; another family still warns."""
    from sae_mlops.sources.validate import model_name_warning, same_family

    assert model_name_warning("Qwen/Qwen3-0.6B", _named("/data/chem-ckpt", "Qwen3ForCausalLM")) is None
    assert model_name_warning("gpt2-small", _named("my-gpt2-copy", "GPT2LMHeadModel")) is None
    assert model_name_warning("EleutherAI/pythia-70m-deduped", _named("ckpt", "GPTNeoXForCausalLM")) is None
    warned = model_name_warning("Qwen/Qwen3-0.6B", _named("/data/other", "LlamaForCausalLM"))
    assert warned is not None and "may be meaningless" in warned
    assert model_name_warning("Qwen/Qwen3-0.6B", _named("/data/other", None)) is not None
    assert not same_family("gpt2", "Qwen3ForCausalLM") and not same_family("qwen3", "")
