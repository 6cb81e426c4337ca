"""The data owner never loads the outsourced base weights of a checkpoint on disk."""

import torch

from hetune.models.client_weights import load_client_model
from hetune.models.layers import decoder_layers, member_linear, op_groups
from hetune.models.loading import load_model


def test_directory_load_skips_outsourced_weights(tmp_path):
    full = load_model("tiny-llama", seed=5)
    full.model.save_pretrained(tmp_path)
    full.tokenizer.save_pretrained(tmp_path)
    members = [m for g in op_groups(full.model.config) for m in g.members]
    client = load_client_model(str(tmp_path), members)
    layers = decoder_layers(client.model)
    for path in members:
        w = member_linear(layers, path).weight
        assert w.untyped_storage().nbytes() == 4  # a placeholder, not the weight
        assert w.shape == member_linear(decoder_layers(full.model), path).weight.shape
    kept = {n: t for n, t in client.model.state_dict().items() if "_proj" not in n}
    original = full.model.state_dict()
    assert kept and all(torch.equal(t, original[n]) for n, t in kept.items())
    held = sum(p.untyped_storage().nbytes() for p in client.model.parameters())
    assert held < 0.1 * sum(p.numel() * 4 for p in full.model.parameters())
    rotary = client.model.get_decoder().rotary_emb
    assert not rotary.inv_freq.is_meta
    torch.testing.assert_close(rotary.inv_freq, full.model.get_decoder().rotary_emb.inv_freq)
    assert client.tokenizer("abc")["input_ids"] == full.tokenizer("abc")["input_ids"]


def test_quantized_private_model_from_directory_matches_builtin(tmp_path, bundle_dir):
    from hetune.protocols.hybrid_lora.owner.client import build_private_model

    full = load_model("tiny-llama", seed=0)
    full.model.save_pretrained(tmp_path)
    full.tokenizer.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    a = build_private_model("tiny-llama", "quantized", bundle=bundle_dir)
    b = build_private_model(str(tmp_path), "quantized", bundle=bundle_dir)
    assert torch.equal(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits)
