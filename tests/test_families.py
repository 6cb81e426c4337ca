"""Qwen2 (q/k/v biases, added by the data owner) and Qwen3 (per-head q/k norms) run like Llama.

Each family's tiny model is saved as a Hugging Face directory, compiled with the
library's compile function, and run through the private model on ``plain`` and
``quantized``: plain must be the original model, quantized within the quantization error.
"""

import pytest
import torch

from hetune.compile.bundle import write_bundle
from hetune.compile.compiler import CompileConfig, compile_model
from hetune.errors import ModelLoadError
from hetune.models.builtin import byte_tokenizer
from hetune.models.loading import load_config, load_model
from hetune.protocols.hybrid_lora.owner.client import build_private_model
from hetune.protocols.hybrid_lora.owner.layer import OutsourcedLinear

IDS = torch.tensor([[100, 101, 102, 32, 102, 40, 120, 41, 58]])  # "def f(x):"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def family(request, family_model, tmp_path_factory):
    """(original model, its directory, a bundle compiled from it)."""
    model = family_model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    compiled = compile_model(load_model(str(root / "model")), CompileConfig(calibration_tokens=32), progress=False)
    assert not [k for k in compiled.tensors if "bias" in k]  # biases never go to the worker
    write_bundle(root / "bundle", compiled.manifest, compiled.tensors, compiled.report)
    return model, root / "model", root / "bundle"


def test_plain_equals_the_original_and_quantized_is_within_quantization_error(family):
    model, path, bundle = family
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
        plain = build_private_model(str(path), "plain").model(input_ids=IDS).logits
        quantized = build_private_model(str(path), "quantized", bundle=bundle).model(input_ids=IDS).logits
    assert rel(plain, reference) < 1e-5  # float weights without bias + the client's bias = the model
    assert 0 < rel(quantized, plain) < 0.05  # 8-bit weights and activations: about 1% measured


def test_client_keeps_biases_and_qk_norms(family):
    model, path, bundle = family
    pm = build_private_model(str(path), "quantized", bundle=bundle)
    ours, theirs = pm.model.base_model.model.model.layers[1].self_attn, model.model.layers[1].self_attn
    q = ours.q_proj.base_layer
    assert isinstance(q, OutsourcedLinear)
    if model.config.model_type == "qwen2":
        torch.testing.assert_close(q.bias, theirs.q_proj.bias, rtol=0, atol=0)
    else:
        assert q.bias is None
        torch.testing.assert_close(ours.q_norm.weight, theirs.q_norm.weight, rtol=0, atol=0)


@pytest.mark.parametrize("config_class, family_name", [("GPT2Config", "gpt2"), ("Qwen2MoeConfig", "qwen2_moe"), ("Phi3Config", "phi3")])
def test_other_families_are_refused_by_name(tmp_path, config_class, family_name):
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"'{family_name}' model, not a Llama-class") as info:
        load_config(str(tmp_path))
    assert "qwen2, qwen3" in info.value.hint


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
