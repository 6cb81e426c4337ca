"""Several data owners on one worker: own session, keys, adapter and parameter set each; nothing mixes.

Two owners train one step at the same time (threads) through one loopback worker, one
under rlwe p128 (N = 2048) and one under p192 (N = 4096). rlwe is exact, so each gets the
LoRA gradients of its own ``quantized`` run bit for bit, and clearly not the other owner's.
"""

import threading

import httpx
import pytest
import torch

from hetune.compile.bundle import load_bundle
from hetune.protocols.hybrid_lora.owner import backends
from hetune.protocols.hybrid_lora.owner.client import build_private_model

pytestmark = pytest.mark.he

OWNERS = {  # name: (param set, tokens, seed for LoRA B); the base model and LoRA A are the bundle's (seed 0)
    "clinic": ("p128", torch.tensor([[72, 105]]), 11),
    "bank": ("p192", torch.tensor([[79, 107]]), 22),
}


def lora_grads(pm, ids, seed) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.flatten() for _, p in pm.model.named_parameters() if p.requires_grad])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_two_owners_train_concurrently_without_mixing(micro_bundle, loopback_worker, monkeypatch):
    bundle = load_bundle(micro_bundle)
    errors: dict[int, list[float]] = {}
    original = backends.EncryptedBackend._round_trip

    def audited(self, op, direction, tq, out_cols):  # every decrypted product vs the integer reference
        raw = original(self, op, direction, tq, out_cols)
        lin = bundle.op(op)
        exact = lin.raw_forward(tq.q) if direction == "forward" else lin.raw_backward(tq.q)
        errors.setdefault(id(self), []).append(float((raw - exact).abs().max()))
        return raw

    monkeypatch.setattr(backends.EncryptedBackend, "_round_trip", audited)
    reference = {name: lora_grads(build_private_model("micro-llama", "quantized", bundle=micro_bundle), ids, seed)
                 for name, (_, ids, seed) in OWNERS.items()}
    worker = loopback_worker(max_sessions=4)
    models = {name: build_private_model("micro-llama", "remote", workers=(worker.url,), scheme="rlwe", param_set=ps)
              for name, (ps, _, _) in OWNERS.items()}
    assert {(m.backend.keys.params.scheme, m.backend.keys.params.name) for m in models.values()} == {("rlwe", "p128"), ("rlwe", "p192")}
    results, failures = {}, []

    def train(name):
        try:
            _, ids, seed = OWNERS[name]
            results[name] = lora_grads(models[name], ids, seed)
        except BaseException as err:  # surfaced below
            failures.append(err)

    threads = [threading.Thread(target=train, args=(name,)) for name in OWNERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures
    assert httpx.get(f"{worker.url}/v2/health").json()["sessions"] == 2  # one session per owner
    for name, pm in models.items():
        assert torch.equal(results[name], reference[name]), name  # exact: the quantized run's gradients
        audit = errors[id(pm.backend)]
        assert len(audit) == pm.backend.stats.round_trips == 15 and max(audit) == 0
    assert rel(results["clinic"], reference["bank"]) > 0.5 and rel(results["bank"], reference["clinic"]) > 0.5
    # the p128 owner's ciphertexts pad its 2 tokens to 2,048 coefficients, the p192 owner's to 4,096
    sent = {name: pm.backend.stats.bytes_sent / pm.backend.stats.round_trips for name, pm in models.items()}
    assert 0.49 < sent["clinic"] / sent["bank"] < 0.51
    for pm in models.values():
        pm.close()
