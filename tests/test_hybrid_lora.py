"""One training step on every backend: same code; the batched RLWE steps equal ``quantized`` bit for bit.

The GLWE comparison step is real Concrete ML encryption (about 2,400 output values).
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from hetune.compile.bundle import load_bundle
from hetune.crypto.glwe import RESULT_NOISE_BOUND
from hetune.crypto.keys import generate_keys
from hetune.crypto.rlwe_keys import RlweKeys
from hetune.protocols.hybrid_lora.owner import backends
from hetune.protocols.hybrid_lora.owner.client import LoraSettings, build_private_model, wrap_lora
from hetune.protocols.hybrid_lora.owner.remote import WorkerClient

IDS = torch.tensor([[72, 101, 108]])  # "Hel": 3 tokens, 2 loss positions


def lora_grads(pm, ids=IDS) -> dict[str, torch.Tensor]:
    """LoRA gradients (and the loss, as "loss") of one step, with LoRA B set non-zero so A gets gradients too."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    loss = pm.model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": loss.detach()[None], **{n: p.grad.clone() for n, p in pm.model.named_parameters() if p.requires_grad}}


def assert_equal_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def rel(a, b):
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


@pytest.fixture(scope="module")
def keys():
    return generate_keys("rlwe")


@pytest.fixture(scope="module")
def reference(micro_bundle):
    plain = lora_grads(build_private_model("micro-llama", "plain"))
    quantized = lora_grads(build_private_model("micro-llama", "quantized", bundle=micro_bundle))
    return plain, quantized


@pytest.fixture
def noise_audit(monkeypatch, micro_bundle):
    """Check every decrypted product of a step against the bundle's integer reference."""
    bundle = load_bundle(micro_bundle)
    errors = []
    original = backends.EncryptedBackend._round_trip

    def audited(self, op, direction, tq, out_cols):
        raw = original(self, op, direction, tq, out_cols)
        lin = bundle.op(op)
        exact = lin.raw_forward(tq.q) if direction == "forward" else lin.raw_backward(tq.q)
        errors.append(float((raw - exact).abs().max()))
        return raw

    monkeypatch.setattr(backends.EncryptedBackend, "_round_trip", audited)
    return errors


def test_plain_and_quantized_agree(reference):
    plain, quantized = reference
    assert set(plain) == set(quantized) and len(plain) == 1 + 2 * 7 * 2  # loss; A and B of 7 linears x 2 blocks
    assert 0 < rel(quantized, plain) < 0.05


def test_encrypted_step_equals_quantized_bit_for_bit(reference, micro_bundle, keys, noise_audit):
    _, quantized = reference
    pm = build_private_model("micro-llama", "encrypted", bundle=micro_bundle, keys=keys)
    assert pm.backend.keys.params.scheme == "rlwe"
    grads = lora_grads(pm)
    assert pm.backend.stats.round_trips == len(noise_audit) > 0
    # 8 forward ops; backward skips layers.0.qkv, whose input needs no gradient
    assert len(noise_audit) == 8 + 7
    assert max(noise_audit) == 0  # every product of the step, forward and backward, fused ops included
    assert_equal_grads(grads, quantized)


def test_steps_over_several_ciphertext_blocks_equal_quantized(micro_bundle, keys, noise_audit):
    """4 x 600 = 2,400 tokens: more than one ring of N = 2048 per ciphertext."""
    ids = torch.randint(0, 256, (4, 600), generator=torch.Generator().manual_seed(5))
    quantized = lora_grads(build_private_model("micro-llama", "quantized", bundle=micro_bundle), ids)
    encrypted = lora_grads(build_private_model("micro-llama", "encrypted", bundle=micro_bundle, keys=keys), ids)
    assert max(noise_audit) == 0 and len(noise_audit) == 15
    assert_equal_grads(encrypted, quantized)


@pytest.mark.he
def test_glwe_scheme_step_stays_within_its_noise_bound(reference, micro_bundle, noise_audit):
    """Concrete ML's GLWE behind the same interface: approximate, within its bound."""
    _, quantized = reference
    pm = build_private_model("micro-llama", "encrypted", bundle=micro_bundle, scheme="glwe")
    assert pm.backend.keys.params.scheme == "glwe"
    grads = lora_grads(pm)
    assert len(noise_audit) == 15 and 0 < max(noise_audit) <= RESULT_NOISE_BOUND
    assert 0 < rel(grads, quantized) < 0.03


def test_remote_step_equals_quantized_and_leaks_nothing(reference, loopback_worker, keys, noise_audit, monkeypatch):
    _, quantized = reference
    sent = []
    original = WorkerClient._request

    def recording(self, method, path, **kwargs):
        sent.append(kwargs.get("content") or b"")
        return original(self, method, path, **kwargs)

    monkeypatch.setattr(WorkerClient, "_request", recording)
    plaintexts = []
    original_encrypt = RlweKeys.encrypt

    def spy_encrypt(self, q):
        plaintexts.append(np.asarray(q, dtype=np.int64))
        return original_encrypt(self, q)

    monkeypatch.setattr(RlweKeys, "encrypt", spy_encrypt)
    worker = loopback_worker()
    pm = build_private_model("micro-llama", "remote", workers=(worker.url,), keys=keys)
    grads = lora_grads(pm)
    assert max(noise_audit) == 0
    assert_equal_grads(grads, quantized)
    assert pm.backend.stats.bytes_sent > 0 and pm.backend.stats.bytes_received > 0

    bodies = [b for b in sent if b]
    assert len(bodies) == len(noise_audit)  # no key upload: one ciphertext per round trip
    secret = np.packbits(keys._secret.numpy().astype(np.uint8)).tobytes()
    windows = [secret[i : i + 16] for i in range(0, len(secret) - 16, 16)]
    for body in bodies:
        assert not any(w in body for w in windows)
        for q in plaintexts:
            for row in q:
                for dtype in (np.uint8, np.int8, np.int64, np.float64):
                    if len(row) >= 16:
                        assert row.astype(dtype).tobytes() not in body
    pm.close()


def test_backend_without_bundle_fails_at_build():
    from hetune.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a bundle"):
        build_private_model("micro-llama", "quantized")
    with pytest.raises(ConfigError, match="needs at least one worker"):
        build_private_model("micro-llama", "remote")
    with pytest.raises(ConfigError, match="unknown"):
        build_private_model("micro-llama", "gpu")


def test_bundle_with_lm_head_is_refused_by_the_client(tmp_path):
    from hetune.compile.compiler import CompileConfig, compile_bundle
    from hetune.errors import ConfigError

    compile_bundle("micro-llama", tmp_path / "b", CompileConfig(include_lm_head=True, calibration_tokens=16), progress=False)
    with pytest.raises(ConfigError, match="without --lm-head"):
        build_private_model("micro-llama", "quantized", bundle=tmp_path / "b")


@pytest.fixture(scope="module")
def unrotated_bundle(tmp_path_factory):
    """micro-llama compiled without the (default) Hadamard rotation: W itself quantized."""
    from hetune.compile.compiler import CompileConfig, compile_bundle
    from hetune.quant.config import QuantConfig

    out = tmp_path_factory.mktemp("micro-unrotated") / "bundle"
    compile_bundle("micro-llama", out, CompileConfig(quant=QuantConfig(rotation="none"), calibration_tokens=32), progress=False)
    return out


def test_rotation_on_and_off_both_stay_exact_in_process_and_remote(reference, micro_bundle, unrotated_bundle, keys):
    """The rotation is the client codec's business (from the manifest, also over HTTP); the worker's product is exact either way."""
    from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker

    plain, rotated = reference
    assert load_bundle(micro_bundle).op("layers.1.down").codec.rotation is not None  # the default bundle rotates
    quantized = lora_grads(build_private_model("micro-llama", "quantized", bundle=unrotated_bundle))
    assert 0 < rel(quantized, plain) < 0.05 and not torch.equal(flat(quantized), flat(rotated))
    assert_equal_grads(lora_grads(build_private_model("micro-llama", "encrypted", bundle=unrotated_bundle, keys=keys)), quantized)
    worker = LoopbackWorker(load_bundle(unrotated_bundle))
    try:
        pm = build_private_model("micro-llama", "remote", workers=(worker.url,), keys=keys)
        assert all(c.rotation is None for c in pm.backend.codecs.values())
        assert_equal_grads(lora_grads(pm), quantized)
        pm.close()
    finally:
        worker.stop()


def counting_products(pm) -> dict:
    """Count the backend's products per direction from now on."""
    calls = {"forward": 0, "backward": 0}
    for direction in calls:
        original = getattr(pm.backend, direction)

        def counted(op, x, _original=original, _direction=direction):
            calls[_direction] += 1
            return _original(op, x)

        setattr(pm.backend, direction, counted)
    return calls


def test_checkpointed_layers_give_the_same_gradients_without_asking_the_worker_again(reference, micro_bundle):
    """Activation checkpointing recomputes the owner's clear ops in backward but replays the worker's answers: the
    gradients equal the uncheckpointed quantized step's exactly, with the same products, and nothing is left kept."""
    _, quantized = reference
    plain_pm = build_private_model("micro-llama", "quantized", bundle=micro_bundle)
    plain_pm.model.train()
    without = counting_products(plain_pm)
    lora_grads(plain_pm)
    pm = build_private_model("micro-llama", "quantized", bundle=micro_bundle, checkpoint=True)
    assert pm.model.training
    calls = counting_products(pm)
    taken = []
    take = pm.replay.take
    pm.replay.take = lambda op, x: taken.append(op.name) or take(op, x)
    assert_equal_grads(lora_grads(pm), quantized)
    assert calls == without and without["forward"] == len(pm.ops)  # no product asked twice
    assert sorted(taken) == sorted(pm.ops)  # backward did recompute every layer's ops, from the kept answers
    assert not pm.replay._kept


def test_checkpointed_encrypted_step_equals_quantized(reference, micro_bundle):
    _, quantized = reference
    pm = build_private_model("micro-llama", "encrypted", bundle=micro_bundle, checkpoint=True)
    assert_equal_grads(lora_grads(pm), quantized)
    assert pm.backend.stats.round_trips == 2 * len(pm.ops) - 1  # the lowest op's input needs no gradient


def test_chunked_lm_loss_agrees_with_transformers_and_never_saves_whole_logits():
    """The checkpointed loss equals transformers' to float rounding (value and gradients, ignored labels too), and
    backward keeps no tensor of T x vocab: the logits only ever exist a chunk at a time."""
    from hetune.models.loading import load_model
    from hetune.protocols.hybrid_lora.owner.client import LOSS_CHUNK, chunked_lm_loss

    model = wrap_lora(load_model("micro-llama").model, LoraSettings(), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :40] = -100  # a prompt left out of the loss
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    big = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: big.append(t.numel()) or t, lambda t: t):
        loss = chunked_lm_loss(model, ids, labels)
    loss.backward()
    assert ids.numel() > LOSS_CHUNK
    assert torch.allclose(loss, reference, rtol=1e-6, atol=0) and loss.item() != 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, expected[n], rtol=1e-4, atol=1e-7), n
    assert max(big) < ids.numel() * model.config.vocab_size


FRAGMENT = """
import threading, numpy as np
from hetune.protocols.hybrid_lora.owner import layer
from hetune.protocols.hybrid_lora.owner.layer import release_freed_heap
layer.TRIM_SLACK_BYTES = 64 << 20  # below this process's size: the one call below trims
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
big = np.ones(3 * 2**20); del big  # a 24 MiB free raises glibc's mmap threshold: 4 MiB blocks then come from heaps
keep, holes = [], []
def work():
    for _ in range(16):
        holes.append(np.ones(2**19)); keep.append(np.ones(2**13))  # 4 MiB freed later, 64 KiB kept between them
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
before = rss(); del holes[:]; freed = rss(); release_freed_heap(); print(before, freed, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap and /proc are Linux's")
def test_the_owner_gives_freed_heap_holes_back_after_each_product():
    # the 1B-shape step's owner grew about 0.35 GiB per layer in such holes before products trimmed the heap
    before, freed, after = map(int, subprocess.run([sys.executable, "-c", FRAGMENT], check=True, capture_output=True,
                                                   text=True).stdout.split())
    holes = 64 * 4 * 2**20
    if before - freed > holes // 2:
        pytest.skip("this C library returned the holes on free already")
    assert freed - after > 3 * holes // 4


def test_the_heap_is_trimmed_only_after_growing_by_the_slack(monkeypatch):
    """A trim returns pages the next product faults back in: products trim once the process grew by the slack."""
    from hetune.protocols.hybrid_lora.owner import layer

    rss, trims = [0], []
    monkeypatch.setattr(layer, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(layer, "_TRIM", lambda pad: (trims.append(rss[0]), rss.__setitem__(0, rss[0] - 100)))
    monkeypatch.setattr(layer, "_trimmed_rss", 0)
    monkeypatch.setattr(layer, "TRIM_SLACK_BYTES", 1000)
    for value in (500, 1000, 1001, 1500, 1900, 2000):  # the trim at 1001 leaves 901
        rss[0] = value
        layer.release_freed_heap()
    assert trims == [1001, 2000]  # 1500 and 1900 are within 1000 of 901
    rss[0] = 400  # the process shrank on its own (a large tensor unmapped): growth counts from there
    layer.release_freed_heap()
    rss[0] = 1401
    layer.release_freed_heap()
    assert trims == [1001, 2000, 1401]
