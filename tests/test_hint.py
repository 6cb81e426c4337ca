"""Fixed masks with a fresh secret per product (the hint): exact steps, secrets used once, a safe hint cache, exact sizes."""

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hetune.crypto import rlwe_keys, rlwe_wire as wire
from hetune.crypto.keys import fixed_mask_keys, generate_keys
from hetune.crypto.rlwe import SCHEME
from hetune.crypto.rlwe_keys import CallKey, SecretReuseError
from hetune.crypto.scheme import PayloadError
from hetune.protocols.hybrid_lora.owner.client import build_private_model

from test_hybrid_lora import assert_equal_grads, lora_grads, noise_audit, reference  # noqa: F401  (fixtures)

N = 2048


def exact(x, w):
    return (x.double() @ w.T.double()).long().numpy()


class LocalWorker:
    """The worker's product in this process, counting hint queries; ``damage`` alters the hints it returns."""

    def __init__(self, weights):
        self.weights, self.queries, self.damage = weights, 0, None

    def __call__(self, op, direction, query, rows, cols, sink):
        SCHEME.check_request(SCHEME.params("p128"), query, rows, cols)
        self.queries += 1
        sink.begin()
        chunks = SCHEME.multiply_stream(SCHEME.params("p128"), None, query, self.weights[(op, direction)])
        if self.damage:
            chunks = [self.damage(b"".join(chunks))]
        for chunk in chunks:
            sink.write(chunk)


@pytest.fixture
def op():
    gen = torch.Generator().manual_seed(11)
    return torch.randint(-127, 128, (40, 24), generator=gen), torch.randint(0, 256, (2100, 24), generator=gen)


def product(keys, w, x, name="op"):
    call = keys.new_call(name, "forward")
    body = call.encrypt(x)
    SCHEME.check_request(keys.params, body, *x.shape)
    return call.decrypt(SCHEME.multiply(keys.params, None, body, w), x.shape[0], w.shape[0], x.shape[1])


def test_fixed_mask_products_are_exact_and_bytes_per_value_are_the_wire_formats(tmp_path, op):
    w, x = op
    keys = fixed_mask_keys("p128", tmp_path)
    worker = LocalWorker({("op", "forward"): w})
    keys.attach("a" * 64, worker)
    for rows in (1, 2048, 2100):  # T < N, T = N, two blocks
        assert np.array_equal(product(keys, w, x[:rows]), exact(x[:rows], w))
    assert worker.queries == 2  # one hint per block, fetched once
    call = keys.new_call("op", "forward")
    body = call.encrypt(x[:2048])
    result = SCHEME.multiply(keys.params, None, body, w)
    assert len(body) == wire.HEADER_BYTES + 24 * N * 6  # 6 B per input value at full blocks (b at 48 bits)
    # per call the body result alone, at 33 bits (4.125 B) per output value: the budget's 29 and 4 for noise and rounding
    assert len(result) == wire.HEADER_BYTES + 40 * N * 33 // 8 + wire.TRAILER_BYTES
    hint_file = keys.cache.dir / "op.forward.0.hint"
    assert hint_file.stat().st_size == wire.HEADER_BYTES + 40 * N * 5 + 2 * wire.DIGEST_BYTES  # once: 39 bits, sent as 40
    fresh_body = generate_keys("rlwe").encrypt(x[:2048])  # today's layout: masks per request
    fresh = SCHEME.multiply(keys.params, None, fresh_body, w)
    assert len(fresh_body) == len(body) and len(fresh) == wire.HEADER_BYTES + 2 * 40 * N * 5 + wire.TRAILER_BYTES  # 10 B per output value


def test_the_unmasking_term_computed_ahead_decrypts_exactly(tmp_path, op):
    """prepare() computes H s in a thread before the answer: the same exact result as computing it as outputs come."""
    w, x = op
    keys = fixed_mask_keys("p128", tmp_path)
    keys.attach("e" * 64, LocalWorker({("op", "forward"): w}))
    for rows in (5, 2100):  # one block, two blocks
        call = keys.new_call("op", "forward")
        call.prepare(rows, w.shape[0], x.shape[1])
        result = SCHEME.multiply(keys.params, None, call.encrypt(x[:rows]), w)
        assert call._unmask.result().shape == (w.shape[0], rows // N + 1, N)
        assert np.array_equal(call.decrypt(result, rows, w.shape[0], x.shape[1]), exact(x[:rows], w))
        call._unmask = None  # the same answer, H s computed while decrypting
        assert np.array_equal(call.decrypt(result, rows, w.shape[0], x.shape[1]), exact(x[:rows], w))


def test_chunks_encrypted_side_by_side_come_in_order_and_decrypt_exactly(tmp_path, monkeypatch):
    """A request of several chunks is encrypted on the pool's single-core threads, two at a time: the body is
    the chunks in order (any swap would decrypt to the wrong features), under both mask layouts and over two
    blocks of tokens; the pool's threads run torch on one core and leave the count of later threads alone."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the pool path, whatever the machine
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randint(-127, 128, (9, 300), generator=gen), torch.randint(0, 256, (2100, 300), generator=gen)
    seen = []
    real = rlwe_keys._encrypt_rows
    monkeypatch.setattr(rlwe_keys, "_encrypt_rows", lambda *a: seen.append(threading.current_thread().name) or real(*a))
    keys = fixed_mask_keys("p128", tmp_path)
    keys.attach("f" * 64, LocalWorker({("op", "forward"): w}))
    assert np.array_equal(product(keys, w, x), exact(x, w))
    fresh = generate_keys("rlwe")
    assert np.array_equal(fresh.decrypt(SCHEME.multiply(fresh.params, None, fresh.encrypt(x), w), 2100, 9), exact(x, w))
    assert len(seen) == 6 and all(name.startswith("hetune-encrypt-chunk_") for name in seen)  # 3 chunks, twice
    monkeypatch.undo()
    counts = {}
    rlwe_keys._ENCRYPT_POOLS[2].submit(lambda: counts.update(pool=torch.get_num_threads())).result()
    later = threading.Thread(target=lambda: counts.update(later=torch.get_num_threads()))
    later.start()
    later.join()
    assert counts == {"pool": 1, "later": torch.get_num_threads()}


def test_a_call_key_encrypts_once_and_is_never_saved(tmp_path, op):
    w, x = op
    keys = fixed_mask_keys("p128", tmp_path)
    keys.attach("b" * 64, LocalWorker({("op", "forward"): w}))
    call = keys.new_call("op", "forward")
    call.encrypt(x[:8])
    with pytest.raises(SecretReuseError, match="already encrypted"):
        call.encrypt(x[:8])
    with pytest.raises(TypeError, match="never saved"):
        pickle.dumps(call)
    with pytest.raises(SecretReuseError, match="per call"):
        keys.encrypt(x[:8])
    with pytest.raises(Exception, match="no long-term secret"):
        keys.save(tmp_path / "k")
    secrets_ = {bytes(keys.new_call("op", "forward")._mult.s_hat.numpy().tobytes()) for _ in range(5)}
    assert len(secrets_) == 5  # a fresh secret per call


@pytest.mark.parametrize("damage,refetched", [
    ("truncate", True), ("flip", True), ("other_seed", True), ("other_bundle", True),
])
def test_a_bad_cached_hint_is_fetched_again_never_used(tmp_path, op, damage, refetched):
    w, x = op
    keys = fixed_mask_keys("p128", tmp_path)
    worker = LocalWorker({("op", "forward"): w})
    keys.attach("c" * 64, worker)
    assert np.array_equal(product(keys, w, x[:100]), exact(x[:100], w))
    path = keys.cache.dir / "op.forward.0.hint"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip":
        data[wire.HEADER_BYTES + 1000] ^= 1
    elif damage == "other_seed":
        data[wire.HEADER_BYTES - 1] ^= 1
    path.write_bytes(bytes(data))
    again = fixed_mask_keys("p128", tmp_path)  # an owner restart: same cache, same mask seed
    again.attach("d" * 64 if damage == "other_bundle" else "c" * 64, worker)
    if damage == "other_bundle":  # another bundle has its own directory: fetched there
        assert again.cache.dir != keys.cache.dir
    before = worker.queries
    assert np.array_equal(product(again, w, x[:100]), exact(x[:100], w))
    assert worker.queries == before + 1


def test_a_worker_that_keeps_sending_a_bad_hint_gets_a_clear_error(tmp_path, op):
    w, x = op
    keys = fixed_mask_keys("p128", tmp_path)
    worker = LocalWorker({("op", "forward"): w})
    worker.damage = lambda hint: hint[:-7]
    keys.attach("e" * 64, worker)
    with pytest.raises(PayloadError, match="twice"):
        product(keys, w, x[:10])
    worker.damage = lambda hint: hint[:500] + bytes([hint[500] ^ 1]) + hint[501:]
    with pytest.raises(PayloadError, match="corrupted.*twice"):
        product(keys, w, x[:10])
    assert not list(keys.cache.dir.glob("*.hint"))  # nothing bad stays on disk


def test_cached_hint_is_reused_after_an_owner_restart(tmp_path, op):
    w, x = op
    worker = LocalWorker({("op", "forward"): w})
    first = fixed_mask_keys("p128", tmp_path)
    first.attach("f" * 64, worker)
    product(first, w, x[:10])
    second = fixed_mask_keys("p128", tmp_path)
    second.attach("f" * 64, worker)
    assert second.cache.mask_seed == first.cache.mask_seed
    assert np.array_equal(product(second, w, x[:10]), exact(x[:10], w))
    assert worker.queries == 1


def test_fixed_mask_steps_equal_quantized_in_process_and_remote_across_restarts(reference, micro_bundle, loopback_worker,
                                                                                noise_audit, tmp_path, monkeypatch):  # noqa: F811
    """A whole step of micro-llama, forward and backward, fused ops: in process, remote, an owner restart
    (the cached hints reused) and a worker restart (the same hints still valid); every call its own secret."""
    _, quantized = reference
    secrets_ = []
    original = CallKey.__init__

    def spy(self, *args):
        original(self, *args)
        secrets_.append(self._mult.s_hat.numpy().tobytes())

    monkeypatch.setattr(CallKey, "__init__", spy)
    pm = build_private_model("micro-llama", "encrypted", bundle=micro_bundle, keys=fixed_mask_keys("p128", tmp_path))
    assert_equal_grads(lora_grads(pm), quantized)
    stats = pm.backend.stats
    assert max(noise_audit) == 0 and stats.round_trips == 15 and stats.hint_bytes > 0
    assert len(secrets_) == len(set(secrets_)) == 15  # forward and backward: one fresh secret per product

    worker = loopback_worker()
    pm = build_private_model("micro-llama", "remote", workers=(worker.url,), keys=fixed_mask_keys("p128", tmp_path))
    assert_equal_grads(lora_grads(pm), quantized)
    assert pm.backend.stats.hint_bytes == 0  # the owner restarted: hints from its disk cache
    pm.close()
    worker.stop()
    worker = loopback_worker()  # a worker restart: the hints depend on the bundle and the seed only
    pm = build_private_model("micro-llama", "remote", workers=(worker.url,), keys=fixed_mask_keys("p128", tmp_path))
    assert_equal_grads(lora_grads(pm), quantized)
    assert max(noise_audit) == 0 and len(secrets_) == len(set(secrets_)) == 45
    pm.close()


def test_a_retry_after_a_network_error_re_encrypts(micro_bundle, loopback_worker, tmp_path, monkeypatch):
    import httpx

    from hetune.protocols.hybrid_lora.owner import remote

    worker = loopback_worker()
    pm = build_private_model("micro-llama", "remote", workers=(worker.url,), keys=fixed_mask_keys("p128", tmp_path))
    client = pm.backend.transport.clients[0]
    client.retry = remote.RetryPolicy(retries=2, backoff_s=0.01)
    sent, original = [], client._receive

    def flaky(method, path, max_bytes, content=None, **kwargs):
        if "/ops/" in path and content and len(content) > wire.HEADER_BYTES:
            sent.append(content)
            if len(sent) == 1:
                raise httpx.ConnectError("connection reset")
        return original(method, path, max_bytes, content=content, **kwargs)

    monkeypatch.setattr(client, "_receive", flaky)
    lora_grads(pm, torch.tensor([[72, 101]]))
    assert len(sent) == pm.backend.stats.round_trips + 1  # one product was tried twice
    assert sent[0] != sent[1]  # the retried product was encrypted again, under a new secret
    assert len(set(sent)) == len(sent)
    pm.close()


def test_the_worker_answers_at_the_widths_the_manifest_records(micro_bundle, tmp_path):
    from hetune.compile.bundle import load_bundle

    bundle = load_bundle(micro_bundle)
    params = SCHEME.params(bundle.manifest.crypto.param_set)
    spec = bundle.manifest.ops[0]
    w = bundle.tensors[spec.weight_key]  # (out, in)
    for direction, weight in (("forward", w), ("backward", w.T)):
        keys = fixed_mask_keys("p128", tmp_path)
        keys.attach(bundle.manifest.model.weights_sha256, LocalWorker({(spec.name, direction): weight}))
        call = keys.new_call(spec.name, direction)
        result = SCHEME.multiply(params, None, call.encrypt(torch.zeros(4, weight.shape[1], dtype=torch.int64)), weight)
        recorded = spec.wire_bytes[direction]
        assert wire.Header.parse(result, wire.HINTED_RESULT, "rlwe", "p128").value_bits / 8 == recorded["body"]
        hint = keys.cache.values(spec.name, direction, 0, weight.shape[1], weight.shape[0])[1]
        assert hint / 8 == recorded["hint"]


def test_train_cli_with_a_hint_cache_equals_quantized_at_half_the_download(run_cli, micro_bundle, loopback_worker, stdlib_jsonl, tmp_path):
    """`hetune train --hint-cache DIR`: the remote run's losses equal quantized's, each step downloads only body results
    (half of fresh masks' bytes), and the hints land in DIR once."""
    import json

    data = stdlib_jsonl(4_000)
    worker = loopback_worker()
    common = ["--model", "micro-llama", "--data", data, "--steps", "2", "--seq-len", "8", "--batch-size", "1",
              "--warmup-steps", "1", "--eval-every", "10", "--save-every", "10"]

    def losses_and_bytes(out, *args):
        code, _, err = run_cli("train", *common, "--out", tmp_path / out, *args)
        assert code == 0, err
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], [r["bytes_received"] for r in rows if "bytes_received" in r]

    quantized, _ = losses_and_bytes("q", "--backend", "quantized", "--bundle", micro_bundle)
    fresh, fresh_bytes = losses_and_bytes("fresh", "--backend", "remote", "--worker", worker.url)
    hinted, hinted_bytes = losses_and_bytes("hint", "--backend", "remote", "--worker", worker.url, "--hint-cache", tmp_path / "hints")
    assert hinted == fresh == quantized and len(hinted) == 2
    assert hinted_bytes[1] * 2 <= fresh_bytes[1] + 4096  # body result only (33 bits) against mask and body (2 x 40 bits)
    assert len(list((tmp_path / "hints").rglob("*.hint"))) > 0
    code, _, err = run_cli("train", *common, "--out", tmp_path / "bad", "--backend", "remote", "--worker", worker.url,
                           "--hint-cache", tmp_path / "hints", "--save-key", tmp_path / "k")
    assert code == 2 and "no session key to save or load" in err


# ---- the hint streamed: bounded memory on both sides, a broken or corrupted stream never cached ----

WIDE = "wide"  # 8192 outputs of 8 inputs: an 84 MB hint at 5 B per value, a cheap product


@pytest.fixture
def wide_worker(micro_bundle):
    """A loopback worker serving the micro bundle plus one wide op; yields (url, its Worker, the op's weight)."""
    from hetune.compile.bundle import load_bundle
    from hetune.protocols.hybrid_lora.worker.runner import Worker
    from hetune.protocols.hybrid_lora.worker.server import ServeConfig, create_app
    from hetune.serving.http_api import LoopbackServer

    bundle = load_bundle(micro_bundle)
    worker = Worker(bundle, "cpu")
    weight = torch.randint(-127, 128, (8192, 8), generator=torch.Generator().manual_seed(5))
    worker.weights[WIDE] = weight
    server = LoopbackServer(create_app(bundle, ServeConfig(), worker), "worker", "hetune-worker")
    yield server.url, worker, weight
    server.stop()


def streamed_keys(url, root, retries=2):
    """Fixed-mask keys whose hints come over HTTP from ``url``, streamed into the cache."""
    from hetune.protocols.hybrid_lora.owner.remote import RetryPolicy, WorkerClient

    client = WorkerClient(url, retry=RetryPolicy(retries=retries, backoff_s=0.01))
    keys = fixed_mask_keys("p128", root)
    client.open(keys.params, b"")
    keys.attach("9" * 64, lambda op, d, query, rows, cols, sink: client.run(op, d, query, rows, cols, 2**30, sink))
    return keys, client


def remote_product(keys, client, w, x):
    call = keys.new_call(WIDE, "forward")
    body, _ = client.run(WIDE, "forward", call.encrypt(x), *x.shape, max_bytes=2**30)
    return call.decrypt(body, x.shape[0], w.shape[0], x.shape[1])


def test_the_hint_streams_in_bounded_chunks_on_both_sides(wide_worker, tmp_path):
    """The worker yields the hint a chunk of output rows at a time and the owner writes it to disk as it arrives:
    Python's traced peak (both sides share this process) stays far below the hint's size; products stay exact."""
    import tracemalloc

    from hetune.crypto.rlwe import STREAM_ROWS

    url, _, w = wide_worker
    query = wire.Header(wire.HINT_QUERY, "rlwe", "p128", N, 8, 8, bytes(16)).pack()
    sizes = [len(c) for c in SCHEME.multiply_stream(SCHEME.params("p128"), None, query, w)]
    vb = wire.Header.parse(SCHEME.multiply(SCHEME.params("p128"), None, query, w), wire.HINT, "rlwe", "p128").value_bits
    assert sizes == [wire.HEADER_BYTES] + [wire.packed_bytes(STREAM_ROWS * N, vb)] * (8192 // STREAM_ROWS) + [wire.DIGEST_BYTES]
    keys, client = streamed_keys(url, tmp_path)
    tracemalloc.start()
    try:
        keys.cache.values(WIDE, "forward", 0, 8, 8192)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    hint_bytes = 8192 * N * vb
    assert hint_bytes > 80e6 and peak < hint_bytes / 5, (peak, hint_bytes)  # about 12 MB: a few chunks in flight
    x = torch.randint(0, 256, (300, 8), generator=torch.Generator().manual_seed(6))
    assert np.array_equal(remote_product(keys, client, w, x), exact(x, w))
    client.close()


def rss_file_bytes() -> int:
    """This process's resident file-backed pages (Linux): where a memory-mapped file's touched pages count."""
    status = Path("/proc/self/status").read_text()
    return 1024 * int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile:")))


def test_a_cached_hint_is_read_without_becoming_the_owners_resident_memory(wide_worker, tmp_path):
    """Decryption reads the hint in chunks (positioned reads): a memory map would add every page of it (84 MB
    here, 6 GB for the 1B shape) to the owner's resident memory and its peak, although they are file cache."""
    url, _, w = wide_worker
    x = torch.randint(0, 256, (300, 8), generator=torch.Generator().manual_seed(6))
    warm, warm_client = streamed_keys(url, tmp_path / "warm")
    assert np.array_equal(remote_product(warm, warm_client, w, x), exact(x, w))  # the code paths are loaded
    keys, client = streamed_keys(url, tmp_path / "measured")
    path, _ = keys.cache.values(WIDE, "forward", 0, 8, 8192)
    before = rss_file_bytes()
    assert np.array_equal(remote_product(keys, client, w, x), exact(x, w))
    grown = rss_file_bytes() - before
    assert grown < path.stat().st_size / 4, (grown, path.stat().st_size)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short after its check in this process
    with pytest.raises(PayloadError, match="delete the hint cache"):
        remote_product(keys, client, w, x)
    warm_client.close()
    client.close()


def test_a_stream_cut_off_midway_is_fetched_again_and_never_cached(wide_worker, tmp_path, monkeypatch):
    """The worker's stream breaks after two chunks: the owner fetches it again, the cache holds only the whole hint;
    a worker whose stream always breaks gives a clear error and leaves no file behind. (The worker's access-log
    middleware, Starlette's BaseHTTPMiddleware, ends a broken stream as if it were whole: the owner's size check,
    not the transport, is what catches it.)"""
    url, worker, w = wide_worker
    streams, original = [], worker.run_stream

    def cut(*args, always=False):
        streams.append(1)
        for i, chunk in enumerate(original(*args)):
            if i == 2 and (always or len(streams) == 1):
                raise ConnectionError("worker died mid-stream")
            yield chunk

    monkeypatch.setattr(worker, "run_stream", cut)
    keys, client = streamed_keys(url, tmp_path / "a")
    x = torch.randint(0, 256, (5, 8), generator=torch.Generator().manual_seed(7))
    assert np.array_equal(remote_product(keys, client, w, x), exact(x, w))
    assert len(streams) == 2 and [p.name for p in keys.cache.dir.iterdir() if p.name != "mask_seed"] == ["wide.forward.0.hint"]
    client.close()

    monkeypatch.setattr(worker, "run_stream", lambda *args: cut(*args, always=True))
    keys, client = streamed_keys(url, tmp_path / "b", retries=1)
    with pytest.raises(PayloadError, match=r"truncated\?\), twice"):
        keys.cache.values(WIDE, "forward", 0, 8, 8192)
    assert [p.name for p in keys.cache.dir.iterdir()] == ["mask_seed"]  # no hint, no temp file
    client.close()


def test_a_corrupted_stream_is_fetched_again_then_refused(wide_worker, tmp_path, monkeypatch):
    url, worker, w = wide_worker
    streams, original = [], worker.run_stream

    def flip(*args, always=False):
        streams.append(1)
        for i, chunk in enumerate(original(*args)):
            yield bytes([chunk[0] ^ 1]) + chunk[1:] if i == 3 and (always or len(streams) == 1) else chunk

    monkeypatch.setattr(worker, "run_stream", flip)
    keys, client = streamed_keys(url, tmp_path / "a")
    x = torch.randint(0, 256, (5, 8), generator=torch.Generator().manual_seed(8))
    assert np.array_equal(remote_product(keys, client, w, x), exact(x, w))
    assert len(streams) == 2  # the bad stream was checked in its temp file, dropped and fetched again
    client.close()

    monkeypatch.setattr(worker, "run_stream", lambda *args: flip(*args, always=True))
    keys, client = streamed_keys(url, tmp_path / "b")
    with pytest.raises(PayloadError, match="corrupted.*twice"):
        keys.cache.values(WIDE, "forward", 0, 8, 8192)
    assert [p.name for p in keys.cache.dir.iterdir()] == ["mask_seed"]
    client.close()


# ---- overlap: pipelined products ----

@pytest.mark.parametrize("masks", ["fresh", "fixed"])
def test_overlapped_steps_equal_quantized_and_record_a_timeline(reference, micro_bundle, loopback_worker, noise_audit,
                                                                 tmp_path, monkeypatch, masks):  # noqa: F811
    """Products pipelined in chunks of 8 features up and 8 outputs down (micro-llama's ops have 32 to 128): remote and
    in process equal quantized bit for bit; each product's spans are recorded, and the bytes are the wire format's."""
    from hetune.crypto import rlwe, rlwe_keys

    monkeypatch.setattr(rlwe_keys, "ENCRYPT_FEATURES", 8)
    monkeypatch.setattr(rlwe, "STREAM_ROWS", 8)
    monkeypatch.setattr(rlwe_keys, "_STREAM_BATCH", 8)
    monkeypatch.setattr(rlwe, "FEED_BYTES", 1)  # the worker sums one feature at a time as the body arrives
    _, quantized = reference
    worker = loopback_worker()
    for backend, where in (("remote", {"workers": (worker.url,)}), ("encrypted", {"bundle": micro_bundle})):
        keys = fixed_mask_keys("p128", tmp_path) if masks == "fixed" else None
        pm = build_private_model("micro-llama", backend, keys=keys, overlap=True, **where)
        pm.backend.stats.timeline = []  # off by default: a long run would keep one entry per product
        widths = {spec.name: spec.wire_bytes for spec in pm.manifest.ops}
        assert_equal_grads(lora_grads(pm), quantized)
        st = pm.backend.stats
        assert st.round_trips == len(st.timeline) == 15 and max(noise_audit) == 0
        for span in st.timeline:
            assert span["encrypt"][0] <= span["send"][0] <= span["send"][1] == span["wait"][0] <= span["wait"][1]
            assert span["wait"][1] == span["receive"][0] <= span["receive"][1] <= span["end"]
            assert span["receive"][0] <= span["decrypt"][0] <= span["decrypt"][1] <= span["end"]
            assert 0 < span["encrypt_s"] and 0 < span["decrypt_s"] <= span["receive"][1] - span["receive"][0] + 1e-3
            assert span["send_chunks"] == 1 + -(-span["cols"] // 8)  # the header, then 8 features at a time
            assert span["sent"] == wire.HEADER_BYTES + span["cols"] * N * 6  # 6 B per input value
            recorded = widths[span["op"]][span["direction"]]  # bytes per value: 33 bits (body) or 2 x 40 (masks per request)
            per_value = recorded["body"] if masks == "fixed" else recorded["fresh_result"]
            assert per_value == (4.125 if masks == "fixed" else 10)
            assert span["received"] == wire.HEADER_BYTES + span["out_cols"] * N * per_value + wire.TRAILER_BYTES
            assert span["worker_s"] > 0  # from the streamed result's trailer
        assert st.worker_s == pytest.approx(sum(s["worker_s"] for s in st.timeline)) and st.worker_s > 0
        assert st.bytes_sent == sum(s["sent"] for s in st.timeline) and st.bytes_received == sum(s["received"] for s in st.timeline)
        pm.close()


def _op_request(micro, worker, monkeypatch, spec=None):
    """(url of ``spec``'s forward product (default: the first op), session headers, its weight, the recorded feeds)
    for raw requests to a loopback worker that sums one feature at a time."""
    import httpx

    from hetune.crypto import rlwe

    monkeypatch.setattr(rlwe, "FEED_BYTES", 1)
    fed = []
    feed = rlwe.ProductAccumulator.feed
    monkeypatch.setattr(rlwe.ProductAccumulator, "feed", lambda self, data: (feed(self, data), fed.append(self.done)))
    spec = spec or micro.manifest.ops[0]
    data = httpx.post(f"{worker.url}/v2/sessions").json()
    return f"{worker.url}/v2/sessions/{data['session_id']}/ops/{spec.name}/forward", \
        {"authorization": f"Bearer {data['token']}"}, micro.tensors[spec.weight_key], fed


def test_the_worker_multiplies_a_request_before_its_last_byte_arrives(micro, loopback_worker, monkeypatch):
    """A slowed upload: its last feature is held back until the worker has summed some already; the result is exact
    and ends with the worker's seconds."""
    import time

    import httpx

    url, headers, w, fed = _op_request(micro, loopback_worker(), monkeypatch)
    keys, rows = generate_keys("rlwe"), 5
    q = torch.randint(0, 256, (rows, w.shape[1]), generator=torch.Generator().manual_seed(3))
    chunks = list(keys.encrypt_chunks(q, features=1))  # the header, then one feature each
    seen = []

    def upload():
        yield from chunks[:-1]
        deadline = time.monotonic() + 20
        while not fed and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(list(fed))
        yield chunks[-1]

    size = SCHEME.request_bytes(keys.params, rows, w.shape[1])
    response = httpx.post(url, params={"rows": rows, "cols": w.shape[1], "stream": "true"}, content=upload(),
                          headers={**headers, "content-length": str(size)}, timeout=60)
    assert response.status_code == 200, response.text
    assert seen[0] and seen[0][-1] < w.shape[1]  # features summed while the last was still with the client
    assert fed == list(range(1, w.shape[1] + 1))  # then every feature, once, in order
    reader = keys.decryptor(rows, w.shape[0])
    assert np.array_equal(reader.whole(response.content), exact(q, w))
    assert reader.worker_s > 0


def test_a_truncated_or_broken_upload_is_refused_and_the_worker_keeps_serving(micro, loopback_worker, monkeypatch):
    """An upload that ends short (422), runs long (413) or has a wrong header (400) keeps nothing: the body budget is
    back to zero, and the next request is answered exactly."""
    import httpx

    worker = loopback_worker()
    url, headers, w, fed = _op_request(micro, worker, monkeypatch)
    keys, rows, cols = generate_keys("rlwe"), 3, w.shape[1]
    q = torch.randint(0, 256, (rows, cols), generator=torch.Generator().manual_seed(4))
    query = {"rows": rows, "cols": cols, "stream": "true"}
    chunks = list(keys.encrypt_chunks(q, features=1))
    short = httpx.post(url, params=query, content=iter(chunks[: cols // 2]), headers=headers, timeout=60)  # chunked, ends early
    assert short.status_code == 422 and "truncated" in short.json()["error"]
    assert fed and fed[-1] < cols  # it had started: the sums are dropped with the request
    started = len(fed)
    long = httpx.post(url, params=query, content=iter([*chunks, b"x"]), headers=headers, timeout=60)  # one byte too many
    assert long.status_code == 413 and len(fed) > started
    bad = bytearray(chunks[0])
    bad[5] = wire.RESULT  # a result's kind where a request's belongs: refused at the header, before any sum
    started = len(fed)
    wrong = httpx.post(url, params=query, content=iter([bytes(bad), *chunks[1:]]), headers=headers, timeout=60)
    assert wrong.status_code == 400 and "not an RLWE request" in wrong.json()["error"] and len(fed) == started
    assert worker.server.config.app.state.budget.used == 0
    fine = httpx.post(url, params=query, content=keys.encrypt(q), headers=headers, timeout=60)
    assert fine.status_code == 200 and np.array_equal(keys.decrypt(fine.content, rows, w.shape[0]), exact(q, w))


def test_train_cli_with_overlap_equals_quantized(run_cli, micro_bundle, loopback_worker, stdlib_jsonl, tmp_path):
    """`hetune train --overlap` (and `--checkpoint`): the remote run's losses equal quantized's, with masks per request
    and with the hint; --overlap without encryption is refused."""
    import json

    data = stdlib_jsonl(4_000)
    worker = loopback_worker()
    common = ["--model", "micro-llama", "--data", data, "--steps", "2", "--seq-len", "8", "--batch-size", "1",
              "--warmup-steps", "1", "--eval-every", "10", "--save-every", "10"]

    def losses(out, *args):
        code, _, err = run_cli("train", *common, "--out", tmp_path / out, *args)
        assert code == 0, err
        return [json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    quantized = losses("q", "--backend", "quantized", "--bundle", micro_bundle)
    fresh = losses("fresh", "--backend", "remote", "--worker", worker.url, "--overlap")
    hinted = losses("hint", "--backend", "remote", "--worker", worker.url, "--overlap", "--hint-cache", tmp_path / "hints")
    assert fresh == hinted == quantized and len(quantized) == 2
    checkpointed = losses("ckpt", "--backend", "remote", "--worker", worker.url, "--checkpoint", "--hint-cache", tmp_path / "hints")
    assert checkpointed == losses("qckpt", "--backend", "quantized", "--bundle", micro_bundle, "--checkpoint")
    assert checkpointed == pytest.approx(quantized, rel=1e-5)  # the chunked loss: another summation order
    code, _, err = run_cli("train", *common, "--out", tmp_path / "bad", "--backend", "quantized", "--bundle", micro_bundle, "--overlap")
    assert code == 2 and "--overlap" in err



def test_a_product_whose_sums_exceed_the_budget_is_read_whole_and_still_exact(micro, loopback_worker, monkeypatch):
    """With a 1 MiB body budget, the widest op's sums (4 MiB) do not fit: the worker reads the body whole and multiplies
    after (no piece summed on arrival), and answers exactly."""
    import httpx

    spec = max(micro.manifest.ops, key=lambda s: s.out_features)
    url, headers, w, fed = _op_request(micro, loopback_worker(body_budget_mib=1, owner_body_budget_mib=1), monkeypatch, spec)
    from hetune.protocols.hybrid_lora.worker.runner import Worker

    on_arrival = []
    accumulator = Worker.accumulator
    monkeypatch.setattr(Worker, "accumulator", lambda self, *args: (on_arrival.append(args[0]), accumulator(self, *args))[1])
    keys, rows = generate_keys("rlwe"), 5
    assert SCHEME.product_bytes(keys.params, rows, w.shape[0], w.shape[1]) > 2**20 > SCHEME.request_bytes(keys.params, rows, w.shape[1])
    q = torch.randint(0, 256, (rows, w.shape[1]), generator=torch.Generator().manual_seed(5))
    response = httpx.post(url, params={"rows": rows, "cols": w.shape[1]}, content=keys.encrypt(q), headers=headers, timeout=60)
    assert response.status_code == 200 and not on_arrival and fed  # summed, but only once the body was in
    assert np.array_equal(keys.decrypt(response.content, rows, w.shape[0]), exact(q, w))
