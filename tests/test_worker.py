"""The worker's HTTP surface: every bad request gets its 4xx and the worker keeps serving."""

import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hetune.compile.bundle import load_bundle
from hetune.crypto.glwe import RESULT_NOISE_BOUND, GlweKeys
from hetune.protocols.hybrid_lora import wire
from hetune.protocols.hybrid_lora.server import ServeConfig, create_app

OP = "layers.1.o"  # 32 x 32: one row costs ~0.5 s of GLWE work


@pytest.fixture(scope="module")
def keys():
    return GlweKeys.generate()


@pytest.fixture(scope="module")
def bundle(micro_bundle):
    return load_bundle(micro_bundle)


@pytest.fixture
def client(bundle):
    return TestClient(create_app(bundle, ServeConfig(max_sessions=2, max_rows=8)))


@pytest.fixture
def session(client, keys):
    data = client.post("/v1/sessions", content=keys.compression_key_bytes()).json()
    return data["session_id"], {"authorization": f"Bearer {data['token']}"}


def ciphertext(keys, rows, cols, seed=0):
    q = np.random.default_rng(seed).integers(0, 256, (rows, cols))
    return q, bytes(keys.encrypt(q).serialize())


def run(client, sid, headers, body, op=OP, direction="forward", rows=1, cols=32):
    return client.post(f"/v1/sessions/{sid}/ops/{op}/{direction}", params={"rows": rows, "cols": cols}, content=body, headers=headers)


def assert_still_serving(client, keys, sid, headers, bundle):
    assert client.get("/v1/health").json()["status"] == "ok"
    q, body = ciphertext(keys, 1, 32, seed=1)
    r = run(client, sid, headers, body)
    assert r.status_code == 200
    raw = keys.decrypt(keys.result_from_bytes(r.content), 32)
    exact = q @ bundle.tensors[f"{OP}.weight"].numpy().astype(np.int64).T
    assert np.abs(raw - exact).max() <= RESULT_NOISE_BOUND


def test_ciphertext_size_formula_matches_real_ciphertexts(keys):
    for rows, cols in [(1, 16), (2, 16), (3, 100), (1, 2048), (1, 2049), (2, 4097)]:
        assert len(ciphertext(keys, rows, cols)[1]) == wire.ciphertext_bytes(rows, cols)


def test_info_and_codec(client, bundle):
    info = client.get("/v1/info").json()
    assert info["api_version"] == "v1" and len(info["manifest"]["ops"]) == len(bundle.manifest.ops)
    assert info["manifest"]["crypto"]["result_budget_bits"] == 27
    from safetensors.torch import load

    codec = load(client.get("/v1/codec").content)
    assert set(codec) == {f"{op.name}.{k}" for op in bundle.manifest.ops for k in ("scale", "rowsum")}
    assert not any(t.shape[0] > 1 and t.dim() > 1 for t in codec.values())  # vectors only: no weights


@pytest.mark.parametrize(
    "case,status",
    [
        ("no_token", 401), ("wrong_token", 401), ("unknown_session", 404), ("unknown_op", 404),
        ("bad_direction", 404), ("wrong_cols", 422), ("zero_rows", 422), ("too_many_rows", 422),
        ("truncated", 422), ("oversized", 413), ("corrupt", 400),
    ],
)
def test_bad_requests_get_4xx_and_worker_keeps_serving(client, session, keys, bundle, case, status):
    sid, headers = session
    _, body = ciphertext(keys, 1, 32)
    kwargs = {}
    if case == "no_token":
        headers_used = {}
    elif case == "wrong_token":
        headers_used = {"authorization": "Bearer nope"}
    else:
        headers_used = headers
    if case == "unknown_session":
        sid_used = "0" * 32
    else:
        sid_used = sid
    if case == "unknown_op":
        kwargs["op"] = "layers.9.o"
    if case == "bad_direction":
        kwargs["direction"] = "sideways"
    if case == "wrong_cols":
        kwargs["cols"] = 64
    if case == "zero_rows":
        kwargs["rows"] = 0
    if case == "too_many_rows":
        kwargs["rows"] = 9
    if case == "truncated":
        body = body[:-10]
    if case == "oversized":
        body = body + b"\0" * 5000
    if case == "corrupt":
        body = bytes(np.random.default_rng(3).integers(0, 256, len(body), dtype=np.uint8))
    r = run(client, sid_used, headers_used, body, **kwargs)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert_still_serving(client, keys, sid, headers, bundle)


def test_sessions_are_isolated_capped_and_closed(client, keys, bundle):
    a = client.post("/v1/sessions", content=keys.compression_key_bytes()).json()
    b = client.post("/v1/sessions", content=keys.compression_key_bytes()).json()
    assert client.post("/v1/sessions", content=keys.compression_key_bytes()).status_code == 429
    _, body = ciphertext(keys, 1, 32)
    # a's token does not open b's session
    r = run(client, b["session_id"], {"authorization": f"Bearer {a['token']}"}, body)
    assert r.status_code == 401
    assert client.delete(f"/v1/sessions/{a['session_id']}", headers={"authorization": f"Bearer {a['token']}"}).status_code == 204
    assert run(client, a["session_id"], {"authorization": f"Bearer {a['token']}"}, body).status_code == 404
    assert client.post("/v1/sessions", content=keys.compression_key_bytes()).status_code == 201  # room again


def test_invalid_compression_key_is_refused(client, keys):
    assert client.post("/v1/sessions", content=b"garbage" * 100).status_code == 400
    assert client.post("/v1/sessions", content=keys.compression_key_bytes()[:-1000]).status_code == 400
    assert client.get("/v1/health").status_code == 200


def test_sessions_expire(bundle, keys):
    client = TestClient(create_app(bundle, ServeConfig(session_ttl_s=0.2)))
    s = client.post("/v1/sessions", content=keys.compression_key_bytes()).json()
    time.sleep(0.4)
    _, body = ciphertext(keys, 1, 32)
    assert run(client, s["session_id"], {"authorization": f"Bearer {s['token']}"}, body).status_code == 404
    assert client.get("/v1/health").json()["sessions"] == 0


def test_logs_hold_no_token_or_payload(client, keys, caplog):
    caplog.set_level(logging.INFO, logger="hetune.worker")
    s = client.post("/v1/sessions", content=keys.compression_key_bytes()).json()
    _, body = ciphertext(keys, 1, 32)
    assert run(client, s["session_id"], {"authorization": f"Bearer {s['token']}"}, body).status_code == 200
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert s["token"] not in text and s["session_id"] not in text
    assert "-> 200" in text


def test_worker_path_imports_no_transformers_or_peft():
    code = (
        "import sys, hetune.protocols.hybrid_lora.server, hetune.protocols.hybrid_lora.worker;"
        "print(sorted(m for m in ('transformers', 'peft', 'brevitas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
