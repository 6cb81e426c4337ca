"""The worker's HTTP surface: every bad request gets its 4xx and the worker keeps serving."""

import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hetune.compile.bundle import load_bundle
from hetune.crypto.registry import get_scheme
from hetune.protocols.hybrid_lora.worker.server import ServeConfig, create_app

OP = "layers.1.o"  # 32 x 32


@pytest.fixture
def client(micro):
    return TestClient(create_app(micro, ServeConfig(max_sessions=2, max_rows=8)))


@pytest.fixture
def session(client, rlwe_keys):
    data = client.post("/v2/sessions", content=rlwe_keys.session_key()).json()
    return data["session_id"], {"authorization": f"Bearer {data['token']}"}


def ciphertext(rlwe_keys, rows, cols, seed=0):
    q = np.random.default_rng(seed).integers(0, 256, (rows, cols))
    return q, rlwe_keys.encrypt(q)


def run(client, sid, headers, body, op=OP, direction="forward", rows=1, cols=32):
    return client.post(f"/v2/sessions/{sid}/ops/{op}/{direction}", params={"rows": rows, "cols": cols}, content=body, headers=headers)


def assert_still_serving(client, rlwe_keys, sid, headers, micro):
    assert client.get("/v2/health").json()["status"] == "ok"
    q, body = ciphertext(rlwe_keys, 1, 32, seed=1)
    r = run(client, sid, headers, body)
    assert r.status_code == 200
    exact = q @ micro.tensors[f"{OP}.weight"].numpy().astype(np.int64).T
    assert np.array_equal(rlwe_keys.decrypt(r.content, 1, 32), exact)


def test_request_size_formula_matches_real_requests(rlwe_keys):
    scheme = get_scheme("rlwe")
    for rows, cols in [(1, 16), (2, 16), (3, 100), (2048, 3), (2049, 2), (4097, 1)]:
        assert len(ciphertext(rlwe_keys, rows, cols)[1]) == scheme.request_bytes(rlwe_keys.params, rows, cols)


def test_info_and_codec(client, micro):
    info = client.get("/v2/info").json()
    assert info["api_version"] == "v2" and len(info["manifest"]["ops"]) == len(micro.manifest.ops)
    assert info["default"] == {"scheme": "rlwe", "param_set": "p128"}
    assert set(info["schemes"]) == {"rlwe", "glwe"} and "p128" in info["schemes"]["rlwe"]["param_sets"]
    from safetensors.torch import load

    codec = load(client.get("/v2/codec").content)
    assert set(codec) == {f"{op.name}.{k}" for op in micro.manifest.ops for k in ("scale", "rowsum")}
    assert not any(t.shape[0] > 1 and t.dim() > 1 for t in codec.values())  # vectors only: no weights


@pytest.mark.parametrize(
    "case,status",
    [
        ("no_token", 401), ("wrong_token", 401), ("unknown_session", 404), ("unknown_op", 404),
        ("bad_direction", 404), ("wrong_cols", 422), ("zero_rows", 422), ("too_many_rows", 422),
        ("truncated", 422), ("oversized", 413), ("corrupt", 400), ("other_set", 422), ("header_rows", 422),
    ],
)
def test_bad_requests_get_4xx_and_worker_keeps_serving(client, session, rlwe_keys, micro, case, status):
    sid, headers = session
    _, body = ciphertext(rlwe_keys, 1, 32)
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
    if case == "other_set":  # a well-formed body for another parameter set
        body = body[:14] + b"p192".ljust(8, b"\0") + body[22:]
    if case == "header_rows":  # the header disagrees with the query
        body = body[:22] + (2).to_bytes(4, "little") + body[26:]
    r = run(client, sid_used, headers_used, body, **kwargs)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert_still_serving(client, rlwe_keys, sid, headers, micro)


def test_sessions_are_isolated_capped_and_closed(client, rlwe_keys, micro):
    a = client.post("/v2/sessions", content=rlwe_keys.session_key()).json()
    b = client.post("/v2/sessions", content=rlwe_keys.session_key()).json()
    assert client.post("/v2/sessions", content=rlwe_keys.session_key()).status_code == 429
    _, body = ciphertext(rlwe_keys, 1, 32)
    # a's token does not open b's session
    r = run(client, b["session_id"], {"authorization": f"Bearer {a['token']}"}, body)
    assert r.status_code == 401
    assert client.delete(f"/v2/sessions/{a['session_id']}", headers={"authorization": f"Bearer {a['token']}"}).status_code == 204
    assert run(client, a["session_id"], {"authorization": f"Bearer {a['token']}"}, body).status_code == 404
    assert client.post("/v2/sessions", content=rlwe_keys.session_key()).status_code == 201  # room again


def test_session_requests_are_checked(client):
    assert client.post("/v2/sessions", content=b"garbage").status_code == 413  # RLWE sessions take no key
    r = client.post("/v2/sessions", params={"scheme": "ckks"})
    assert r.status_code == 422 and "ckks" in r.json()["error"]
    r = client.post("/v2/sessions", params={"param_set": "p80"})
    assert r.status_code == 422 and "p80" in r.json()["error"]
    r = client.post("/v2/sessions", params={"scheme": "glwe", "param_set": "p128"}, content=b"x" * 100)
    assert r.status_code == 400 and "compression key" in r.json()["error"]
    assert client.get("/v2/health").status_code == 200


def test_bundle_beyond_a_sets_budget_is_refused_at_session_open(tmp_path):
    """The server re-checks the bundle's accumulator bits against the session's scheme and set."""
    from hetune.compile.compiler import CompileConfig, compile_bundle
    from hetune.quant.config import QuantConfig

    compiled = compile_bundle("micro-llama", tmp_path / "b", CompileConfig(QuantConfig(10, 13, 13), calibration_tokens=16), progress=False)
    assert 27 < max(op.worst_acc_bits for op in compiled.manifest.ops) <= 30
    client = TestClient(create_app(load_bundle(tmp_path / "b")))
    assert client.post("/v2/sessions").status_code == 201
    r = client.post("/v2/sessions", params={"scheme": "glwe"}, content=b"")
    assert r.status_code == 422 and "decrypts 27" in r.json()["error"] and "--scheme glwe --param-set p128" in r.json()["error"]


def test_sessions_expire(micro, rlwe_keys):
    client = TestClient(create_app(micro, ServeConfig(session_ttl_s=0.2)))
    s = client.post("/v2/sessions", content=rlwe_keys.session_key()).json()
    time.sleep(0.4)
    _, body = ciphertext(rlwe_keys, 1, 32)
    assert run(client, s["session_id"], {"authorization": f"Bearer {s['token']}"}, body).status_code == 404
    assert client.get("/v2/health").json()["sessions"] == 0


def test_logs_hold_no_token_or_payload(client, rlwe_keys, caplog):
    caplog.set_level(logging.INFO, logger="hetune.worker")
    s = client.post("/v2/sessions", content=rlwe_keys.session_key()).json()
    _, body = ciphertext(rlwe_keys, 1, 32)
    assert run(client, s["session_id"], {"authorization": f"Bearer {s['token']}"}, body).status_code == 200
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert s["token"] not in text and s["session_id"] not in text
    assert "-> 200" in text


def test_worker_path_imports_no_transformers_or_peft():
    code = (
        "import sys, hetune.protocols.hybrid_lora.worker.server, hetune.protocols.hybrid_lora.worker.runner;"
        "print(sorted(m for m in ('transformers', 'peft', 'brevitas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
