"""Built-in models, tokenizer, loading errors, and which layers are outsourced."""

import json

import pytest
import torch

from hetune.errors import ModelLoadError
from hetune.models.builtin import builtin_config, byte_tokenizer
from hetune.models.layers import decoder_layers, member_linear, op_groups
from hetune.models.loading import load_config, load_model


def test_tiny_llama_has_grouped_query_attention(tiny):
    cfg = tiny.model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert 64 <= cfg.hidden_size <= 256
    logits = tiny.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, cfg.vocab_size)


def test_builtin_seed_is_reproducible():
    a = load_model("tiny-llama", seed=3).model.state_dict()
    b = load_model("tiny-llama", seed=3).model.state_dict()
    c = load_model("tiny-llama", seed=4).model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 257 and tok.pad_token_id == 258


def test_llama_3_2_1b_shape_matches_the_real_model():
    """Parameter counts from the spec (973.1M outsourced of 1,235.8M), on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(builtin_config("llama-3.2-1b-shape"))
    total = sum(p.numel() for p in model.parameters())
    layers = decoder_layers(model)
    outsourced = sum(member_linear(layers, m).weight.numel() for g in op_groups(model.config) for m in g.members)
    assert round(total / 1e6, 1) == 1235.8
    assert round(outsourced / 1e6, 1) == 973.1


def test_peft_wrapped_model_exposes_the_same_base_layers(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=4, target_modules="all-linear"))
    plain, wrapped = decoder_layers(tiny.model), decoder_layers(peft_model)
    for group in op_groups(tiny.model.config, fuse=False):
        (path,) = group.members
        assert torch.equal(member_linear(plain, path).weight, member_linear(wrapped, path).weight)
        assert type(member_linear(wrapped, path)) is torch.nn.Linear


def test_unfused_groups_cover_seven_linears_per_block():
    config = builtin_config("micro-llama")  # 2 blocks
    groups = op_groups(config, fuse=False)
    assert len(groups) == 14 and groups[0].name == "layers.0.q"
    assert [g.name for g in op_groups(config)][:4] == ["layers.0.qkv", "layers.0.o", "layers.0.gate_up", "layers.0.down"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_config(str(tmp_path / "nope"))


def test_non_llama_model_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'gpt2' model, not a supported decoder-only family"):
        load_config(str(tmp_path))


def test_uncached_hub_id_offline_says_how_to_fix(monkeypatch):
    # Both libraries read HF_HUB_OFFLINE at import time, so set their flags directly.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True)
    with pytest.raises(ModelLoadError) as info:
        load_config("hetune-test/not-a-real-model")
    assert "not in the local Hugging Face cache" in info.value.message
    assert "--local-dir" in info.value.hint


def test_local_directory_loads_with_from_pretrained(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(loaded.model.state_dict()[name], tiny.model.state_dict()[name])
    assert loaded.tokenizer("abc")["input_ids"] == tiny.tokenizer("abc")["input_ids"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
