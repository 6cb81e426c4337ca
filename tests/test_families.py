"""Every family record (hetune.models.families) runs privately: one tiny model per record.

Each family's tiny model is saved as a Hugging Face directory, compiled with the
library's compile function, and run through the private model on ``plain``,
``quantized`` and ``remote`` (batched RLWE through a loopback worker): plain must be the
original model, quantized within the quantization error, remote equal to quantized bit
for bit. The data owner's model must hold every tensor of the original except the
outsourced weights (biases, q/k norms, Gemma's offset norms and embedding scale), and
the record's op shapes (which PrivTuner prices) must be the compiled ones.
"""

import pytest
import torch
from conftest import FAMILY_CONFIGS

from hetune.compile.compiler import CompileConfig, compile_bundle
from hetune.errors import ConfigError, ModelLoadError
from hetune.models.builtin import byte_tokenizer
from hetune.models.families import FAMILIES, family_of
from hetune.models.layers import op_groups
from hetune.models.loading import load_config
from hetune.protocols.hybrid_lora.owner.client import LoraSettings, build_private_model, plain_ops
from hetune.protocols.hybrid_lora.owner.layer import OutsourcedLinear

IDS = torch.tensor([[100, 101, 102, 32, 102, 40, 120, 41, 58]])  # "def f(x):"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_family_record_has_a_tiny_model():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, family_model, tmp_path_factory):
    """(original model, its directory, a bundle compiled from it)."""
    model = family_model(request.param)
    assert family_of(model.config).name == request.param
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    compiled = compile_bundle(str(root / "model"), root / "bundle", CompileConfig(calibration_tokens=32), progress=False)
    assert not [k for k in compiled.tensors if "bias" in k]  # biases never go to the worker
    return model, root / "model", root / "bundle"


def test_plain_equals_the_original_and_quantized_is_within_quantization_error(family):
    model, path, bundle = family
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
        plain = build_private_model(str(path), "plain").model(input_ids=IDS).logits
        quantized = build_private_model(str(path), "quantized", bundle=bundle).model(input_ids=IDS).logits
    assert rel(plain, reference) < 1e-5  # float weights without bias + the client's bias = the model
    assert 0 < rel(quantized, plain) < 0.05  # 8-bit weights and activations: about 1% measured


def _base_name(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def test_the_data_owner_keeps_everything_but_the_outsourced_weights(family):
    """Bit for bit: embeddings, every norm, biases, q/k norms, buffers (rotary, Gemma's embedding scale)."""
    model, path, bundle = family
    record = family_of(model.config)
    pm = build_private_model(str(path), "quantized", bundle=bundle)
    ours = {_base_name(n): t for n, t in pm.model.state_dict().items() if "lora_" not in n}
    theirs = model.state_dict()
    outsourced = {f"model.{m}.weight" for g in op_groups(model.config) for m in g.members}
    assert set(theirs) - set(ours) == outsourced  # nothing else is missing
    for name in set(theirs) - outsourced:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    for keep in record.owner_keeps:  # the record's list is true of the model
        assert any(n.startswith(f"model.layers.1.{keep}") for n in ours), keep
    layer = pm.model.base_model.model.model.layers[1]
    assert all(isinstance(getattr(layer, m.split(".")[0]).get_submodule(m.split(".")[1]).base_layer, OutsourcedLinear)
               for m in record.linears)
    embed = pm.model.get_input_embeddings()
    assert getattr(embed, "embed_scale", None) is not None if record.embed_scale else not hasattr(embed, "embed_scale")
    if record.embed_scale:
        assert float(embed.embed_scale) == pytest.approx(model.config.hidden_size**0.5)


@pytest.mark.parametrize("fuse", [True, False])
def test_record_op_shapes_are_the_models(family, fuse):
    """PrivTuner prices a model from the record's shapes without loading it: they must be the real ones."""
    model, _, _ = family
    specs, _ = plain_ops(model, fuse=fuse)
    block0 = [(s.name.removeprefix("layers.0."), s.in_features, s.out_features) for s in specs if s.layer == 0]
    assert family_of(model.config).op_shapes(model.config, fuse=fuse) == block0
    assert len(specs) == len(block0) * model.config.num_hidden_layers


def test_lora_targets_are_checked_against_the_family(family):
    model, path, bundle = family
    record = family_of(model.config)
    with pytest.raises(ConfigError, match="unknown LoRA targets") as info:
        build_private_model(str(path), "quantized", bundle=bundle, lora=LoraSettings(targets=("no_such_proj",)))
    assert ", ".join(record.lora_targets) in info.value.hint
    pm = build_private_model(str(path), "quantized", bundle=bundle, lora=LoraSettings(targets=record.lora_targets[:1]))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in pm.model.named_parameters() if "lora_A" in n}
    assert adapted == {record.lora_targets[0]}


@pytest.mark.parametrize("config_class, family_name", [("GPT2Config", "gpt2"), ("Qwen2MoeConfig", "qwen2_moe")])
def test_other_families_are_refused_by_name(tmp_path, config_class, family_name):
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"'{family_name}' model, not a supported decoder-only family") as info:
        load_config(str(tmp_path))
    assert "qwen2, qwen3, gemma3_text, phi3" in info.value.hint


def test_one_remote_encrypted_step_equals_quantized_bit_for_bit(family):
    """Each family's step through a loopback worker under batched RLWE: loss and every LoRA gradient equal quantized's."""
    from test_hybrid_lora import assert_equal_grads, lora_grads

    from hetune.compile.bundle import load_bundle
    from hetune.crypto.keys import generate_keys
    from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker

    _, path, bundle = family
    quantized = lora_grads(build_private_model(str(path), "quantized", bundle=bundle))
    worker = LoopbackWorker(load_bundle(bundle))
    try:
        pm = build_private_model(str(path), "remote", workers=(worker.url,), keys=generate_keys("rlwe"))
        assert_equal_grads(lora_grads(pm), quantized)
        assert pm.backend.stats.round_trips == 2 * 2 * 4 - 1  # 4 fused ops x 2 blocks, both ways; none for the embeddings' gradient
        pm.close()
    finally:
        worker.stop()


def test_gemma_training_blocks_start_with_bos():
    """Gemma reads a sequence without its <bos> badly; every training block of a Gemma model starts with it."""
    from hetune.data.text import pack

    tok = byte_tokenizer()
    texts = ["def f(x):\n    return x\n", "class A:\n    pass\n"] * 4
    plain, with_bos = pack(texts, tok, 8), pack(texts, tok, 8, bos=tok.bos_token_id)
    assert with_bos.shape[1] == 8 and bool((with_bos[:, 0] == tok.bos_token_id).all())
    n = with_bos.shape[0] * 7
    assert torch.equal(with_bos[:, 1:].flatten(), plain.flatten()[:n])  # the same text stream, 7 tokens a block
    assert [name for name, f in FAMILIES.items() if f.bos_per_block] == ["gemma3"]
