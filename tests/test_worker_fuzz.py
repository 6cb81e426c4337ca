"""Fuzzing the worker's HTTP API in process: whatever arrives, a 2xx or a 4xx, never a 5xx or a crash.

Property-based (hypothesis) over paths, query values, headers and bodies, plus a fixed
corpus of malformed batched-RLWE requests (each header field broken in turn), plus raw
requests to a real uvicorn server with fuzzed Host, Content-Length, Transfer-Encoding and
Authorization headers (framing included), checking that none creates state. The
TestClient re-raises any exception in the app, so a crash fails the test with its
traceback. The default run keeps example counts small (a few seconds); `pytest -m slow`
runs many more.
"""

from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hetune.crypto import rlwe_wire
from hetune.protocols.hybrid_lora.worker.server import ServeConfig, create_app

OP = "layers.1.o"  # 32 x 32
ROWS = 2


@pytest.fixture(scope="module")
def client(micro):
    return TestClient(create_app(micro, ServeConfig(max_sessions=4, max_rows=8)))


@pytest.fixture(scope="module")
def session(client, rlwe_keys):
    data = client.post("/v2/sessions").json()
    return data["session_id"], {"authorization": f"Bearer {data['token']}"}


@pytest.fixture(scope="module")
def valid(rlwe_keys):
    q = np.random.default_rng(0).integers(0, 256, (ROWS, 32))
    return q, rlwe_keys.encrypt(q)


def post_op(client, sid, headers, body, op=OP, direction="forward", rows=ROWS, cols=32):
    return client.post(f"/v2/sessions/{sid}/ops/{op}/{direction}", params={"rows": rows, "cols": cols}, content=body, headers=headers)


def assert_answered(response, allowed=None):
    assert response.status_code < 500, response.text
    if allowed is not None:
        assert response.status_code in allowed, (response.status_code, response.text)
    if response.status_code >= 400 and response.request.method != "HEAD":  # HEAD answers carry no body
        assert "error" in response.json() or "detail" in response.json()  # ours, or FastAPI's query validation


def assert_still_serving(client, rlwe_keys, micro, session, valid):
    sid, headers = session
    q, body = valid
    r = post_op(client, sid, headers, body)
    assert r.status_code == 200
    exact = q @ micro.tensors[f"{OP}.weight"].numpy().astype(np.int64).T
    assert np.array_equal(rlwe_keys.decrypt(r.content, ROWS, 32), exact)


# ---- a corpus of malformed request bodies ----


def put(body: bytes, offset: int, value: bytes) -> bytes:
    return body[:offset] + value + body[offset + len(value) :]


# header (rlwe_wire.HEADER_BYTES = 47) offsets: magic 0, version 4, kind 5, scheme 6, set 14, rows 22, cols 26,
# value bytes 30, seed 31..46
CORPUS = {
    "empty": (lambda b: b"", {400}),
    "one_byte": (lambda b: b[:1], {400}),
    "header_minus_one": (lambda b: b[:46], {400}),
    "header_only": (lambda b: b[:47], {422}),
    "truncated_by_one": (lambda b: b[:-1], {422}),
    "truncated_half": (lambda b: b[: len(b) // 2], {422}),
    "extended_by_one": (lambda b: b + b"\0", {413}),
    "extended_by_a_value": (lambda b: b + b"\0" * 6, {413}),
    "extended_by_a_block": (lambda b: b + b"\0" * (2048 * 6), {413}),
    "magic": (lambda b: put(b, 0, b"HTRX"), {400}),
    "version_0": (lambda b: put(b, 4, b"\0"), {400}),
    "version_255": (lambda b: put(b, 4, b"\xff"), {400}),
    "kind_result": (lambda b: put(b, 5, bytes([rlwe_wire.RESULT])), {400}),
    "kind_255": (lambda b: put(b, 5, b"\xff"), {400}),
    "scheme_glwe": (lambda b: put(b, 6, b"glwe".ljust(8, b"\0")), {422}),
    "scheme_not_utf8": (lambda b: put(b, 6, b"\xff\xfe\xfd\xfc\0\0\0\0"), {422}),
    "set_p192": (lambda b: put(b, 14, b"p192".ljust(8, b"\0")), {422}),
    "set_p256": (lambda b: put(b, 14, b"p256".ljust(8, b"\0")), {422}),
    "set_unknown": (lambda b: put(b, 14, b"p80".ljust(8, b"\0")), {422}),
    "set_not_utf8": (lambda b: put(b, 14, b"\x80" * 8), {422}),
    "rows_0": (lambda b: put(b, 22, (0).to_bytes(4, "little")), {422}),
    "rows_1": (lambda b: put(b, 22, (1).to_bytes(4, "little")), {422}),
    "rows_max": (lambda b: put(b, 22, b"\xff" * 4), {422}),
    "cols_0": (lambda b: put(b, 26, (0).to_bytes(4, "little")), {422}),
    "cols_33": (lambda b: put(b, 26, (33).to_bytes(4, "little")), {422}),
    "cols_max": (lambda b: put(b, 26, b"\xff" * 4), {422}),
    "value_bits_0": (lambda b: put(b, 30, b"\0"), {400}),
    "value_bits_40": (lambda b: put(b, 30, b"\x28"), {400}),
    "value_bits_64": (lambda b: put(b, 30, b"\x40"), {400}),
    "value_bits_255": (lambda b: put(b, 30, b"\xff"), {400}),
    "seed_one_byte_short": (lambda b: b[:31] + b[32:], {422}),  # the seed field swallows the first value byte
    "seed_one_byte_long": (lambda b: b[:46] + b"\0" + b[46:], {413}),
    "seed_flipped": (lambda b: put(b, 31, bytes(16)), {200}),  # still a well-formed request: only the owner can tell
    "values_flipped": (lambda b: put(b, 100, b"\xff" * 64), {200}),
    "random_exact_length": (lambda b: np.random.default_rng(1).bytes(len(b)), {400}),
    "random_short": (lambda b: np.random.default_rng(2).bytes(1000), {400}),
    "zeros": (lambda b: bytes(len(b)), {400}),
    "ones": (lambda b: b"\xff" * len(b), {400}),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_malformed_request_corpus(client, rlwe_keys, micro, session, valid, case):
    mutate, allowed = CORPUS[case]
    sid, headers = session
    assert_answered(post_op(client, sid, headers, mutate(valid[1])), allowed)
    assert_still_serving(client, rlwe_keys, micro, session, valid)


def test_a_result_sent_back_as_a_request_is_refused(client, rlwe_keys, micro, session, valid):
    sid, headers = session
    result = post_op(client, sid, headers, valid[1]).content
    assert_answered(post_op(client, sid, headers, result[: len(valid[1])]), {400})


# ---- property-based ----

FUZZ = dict(deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)


def fuzz_ops(client, session, valid, ops: list[str], examples: int) -> None:
    """Op requests: any op, direction, query, token and body (raw, or a valid one cut, grown or overwritten)."""
    sid, headers = session
    body = valid[1]
    mutated = st.one_of(
        st.binary(max_size=4096),
        st.integers(0, len(body)).map(lambda k: body[:k]),
        st.binary(min_size=1, max_size=64).map(lambda extra: body + extra),
        st.tuples(st.integers(0, len(body) - 1), st.binary(min_size=1, max_size=32)).map(lambda p: put(body, p[0], p[1])[: len(body)]),
    )

    @settings(max_examples=examples, **FUZZ)
    @given(
        op=st.one_of(st.sampled_from(ops), names),
        direction=st.one_of(st.sampled_from(["forward", "backward"]), names),
        rows=st.one_of(st.integers(-2, 10), names),
        cols=st.one_of(st.sampled_from([32, 64, 128]), st.integers(-2, 300), names),
        auth=st.one_of(st.just(headers), st.just({}), names.map(lambda t: {"authorization": b"Bearer " + t.encode()})),
        session_id=st.one_of(st.just(sid), names),
        payload=mutated,
    )
    def run(op, direction, rows, cols, auth, session_id, payload):
        path = f"/v2/sessions/{quote(session_id, safe='')}/ops/{quote(op, safe='')}/{quote(direction, safe='')}"
        assert_answered(client.post(path, params={"rows": rows, "cols": cols}, content=payload, headers=auth))

    run()


def fuzz_sessions(client, examples: int, api_key: str = "") -> None:
    """Session opens with any scheme, set, API key and key body; and closes with any id and token."""

    @settings(max_examples=examples, **FUZZ)
    @given(
        scheme=st.one_of(st.none(), st.sampled_from(["rlwe", "glwe"]), names),
        param_set=st.one_of(st.none(), st.sampled_from(["p128", "p192", "p256"]), names),
        body=st.binary(max_size=512),
        key=st.one_of(st.just(api_key), names),
        close_with=st.one_of(st.none(), names),
    )
    def run(scheme, param_set, body, key, close_with):
        query = {k: v for k, v in (("scheme", scheme), ("param_set", param_set)) if v is not None}
        r = client.post("/v2/sessions", params=query, content=body, headers={"authorization": b"Bearer " + key.encode()})
        assert_answered(r, {201, 400, 401, 413, 422, 429})
        if r.status_code == 201:
            sid, token = r.json()["session_id"], r.json()["token"]
            auth = {"authorization": b"Bearer " + (close_with if close_with is not None else token).encode()}
            assert_answered(client.delete(f"/v2/sessions/{sid}", headers=auth), {204, 401})
            client.delete(f"/v2/sessions/{sid}", headers={"authorization": f"Bearer {token}"})

    run()


def fuzz_routes(client, examples: int) -> None:
    """Any method on any path under and beside the API."""
    segment = st.one_of(st.sampled_from(["v2", "sessions", "ops", "health", "info", "codec", "forward", ".."]),
                        names.filter(bool))  # an empty first segment makes "//...", which httpx refuses to send

    @settings(max_examples=examples, **FUZZ)
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
           segments=st.lists(segment, max_size=6), body=st.binary(max_size=256))
    def run(method, segments, body):
        path = "/" + "/".join(quote(s, safe="") for s in segments)
        assert_answered(client.request(method, path, content=body))

    run()


@pytest.fixture(scope="module")
def admitted(micro, tmp_path_factory):
    """A worker that admits by API key (a tight request rate, so 429s come up too) and one owner's key."""
    from hetune.serving.admission import OwnerLimits, add_owner

    path = tmp_path_factory.mktemp("rlwe_keys") / "rlwe_keys.txt"
    key = add_owner(path, "clinic")
    cfg = ServeConfig(max_sessions=4, max_rows=8, api_keys=path, owner_limits=OwnerLimits(sessions=2, requests_per_minute=30))
    return TestClient(create_app(micro, cfg)), key


def fuzz_all(client, admitted, rlwe_keys, micro, session, valid, examples: int) -> None:
    fuzz_ops(client, session, valid, [op.name for op in micro.manifest.ops], examples)
    fuzz_sessions(client, examples // 3)
    fuzz_routes(client, examples // 3)
    fuzz_sessions(admitted[0], examples // 3, api_key=admitted[1])
    fuzz_routes(admitted[0], examples // 3)
    assert_still_serving(client, rlwe_keys, micro, session, valid)
    assert admitted[0].post("/v2/sessions", headers={"authorization": f"Bearer {admitted[1]}"}).status_code in (201, 429)


def test_fuzz_worker_api(client, admitted, rlwe_keys, micro, session, valid):
    fuzz_all(client, admitted, rlwe_keys, micro, session, valid, examples=150)


@pytest.mark.slow
def test_fuzz_worker_api_long(client, admitted, rlwe_keys, micro, session, valid):
    fuzz_all(client, admitted, rlwe_keys, micro, session, valid, examples=3000)


# ---- raw headers against the real server ----


def raw_status(port: int, request: bytes, half_close: bool) -> int | None:
    """Send bytes as they are; the answer's status, or None if the server closed the link without one."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        data = b""
        try:  # the server may answer and close before it has all the bytes
            conn.sendall(request)
            if half_close:
                conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    fields = data.split(b" ", 2)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=40)


def fuzz_headers(port: int, sid: str, token: str, valid: bytes, examples: int, kinds: int = 5) -> None:
    """Any Host, Content-Length, Transfer-Encoding and Authorization (framing included: uvicorn parses it) on the
    routes that create or use state; the body is sent as is, chunk-encoded or not, and the link maybe half-closed.
    ``kinds``: at least this many different answers (statuses, or none) must come back."""
    import collections

    seen = collections.Counter()

    product = ("POST", f"/v2/sessions/{sid}/ops/{OP}/forward?rows={ROWS}&cols=32")

    def mostly(usual, unusual):
        """Three draws in four keep the usual value, so most requests get past the parser to the routes."""
        return st.one_of(st.just(usual), st.just(usual), st.just(usual), unusual)

    @settings(max_examples=examples, **FUZZ)
    @given(
        route=st.sampled_from([("POST", "/v2/sessions"), ("POST", "/v2/sessions?scheme=glwe"),
                               ("DELETE", f"/v2/sessions/{'cd' * 16}"), ("GET", "/v2/health"), ("GET", "/v2/info")]
                              + [product] * 4),  # mostly products
        host=mostly("127.0.0.1", st.one_of(st.sampled_from(["", "a/?x=", "evil/v2/sessions#", "[::1", "x:99999", "h" * 300]),
                                           header_text)),
        length=mostly("exact", st.one_of(st.none(), st.integers(-5, 2**40).map(str),
                                         st.sampled_from(["", "1e3", "0x10", " 5", "5, 5", "+5"]), header_text)),
        encoding=mostly(None, st.one_of(st.sampled_from(["chunked", "gzip, chunked", "identity", "chunked, gzip", "CHUNKED", "x"]),
                                        header_text)),
        auth=mostly(f"Bearer {token}", st.one_of(st.none(), st.sampled_from(["Bearer", "Bearer ", "Basic abc", f"bearer {token}"]),
                                                 header_text.map(lambda t: "Bearer " + t))),
        body=st.one_of(st.just(valid), st.binary(max_size=600)),
        chunked_body=mostly(False, st.just(True)),
        half_close=st.booleans(),
    )
    @example(route=product, host="127.0.0.1", length="exact", encoding=None, auth=f"Bearer {token}", body=valid,
             chunked_body=False, half_close=True)  # the harness itself sends a request that works
    def run(route, host, length, encoding, auth, body, chunked_body, half_close):
        method, target = route
        if chunked_body:
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"Content-Length: {len(body) if length == 'exact' else length}"] if length is not None else []
        lines += [f"Transfer-Encoding: {encoding}"] if encoding is not None else []
        lines += [f"Authorization: {auth}"] if auth is not None else []
        status = raw_status(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, half_close)
        seen[status] += 1
        assert status is None or status < 500, status

    run()
    assert seen[400] and seen[401] and seen[200] and len(seen) >= kinds, seen  # parser, admission and the products were reached
    print(f"header fuzz statuses: {dict(seen)}")


def fuzz_headers_all(micro, rlwe_keys, valid, tmp_path_factory, examples: int) -> None:
    import httpx

    from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker
    from hetune.serving.admission import add_owner

    path = tmp_path_factory.mktemp("header_keys") / "keys.txt"
    key = add_owner(path, "clinic")
    cfg = ServeConfig(max_sessions=4, max_rows=8, api_keys=path, body_timeout_s=1.0)
    with LoopbackWorker(micro, cfg) as worker:
        auth = {"authorization": f"Bearer {key}"}
        s = httpx.post(f"{worker.url}/v2/sessions", headers=auth).json()
        fuzz_headers(int(worker.url.rsplit(":", 1)[1]), s["session_id"], s["token"], valid[1], examples)
        assert httpx.get(f"{worker.url}/v2/health", headers=auth).json()["sessions"] <= 1  # the fuzz opened none (no key)
        q, body = valid
        r = httpx.post(f"{worker.url}/v2/sessions/{s['session_id']}/ops/{OP}/forward", params={"rows": ROWS, "cols": 32},
                       content=body, headers={"authorization": f"Bearer {s['token']}"})
        if r.status_code == 404:  # the fuzz may have closed it (DELETE with its token): the worker still serves
            s = httpx.post(f"{worker.url}/v2/sessions", headers=auth).json()
            r = httpx.post(f"{worker.url}/v2/sessions/{s['session_id']}/ops/{OP}/forward", params={"rows": ROWS, "cols": 32},
                           content=body, headers={"authorization": f"Bearer {s['token']}"})
        assert r.status_code in (200, 429), r.text  # 429: the fuzz may have spent the owner's rate with its token
        assert worker.server.config.app.state.budget.used == 0  # every body's hold was given back


def test_fuzz_headers(micro, rlwe_keys, valid, tmp_path_factory):
    fuzz_headers_all(micro, rlwe_keys, valid, tmp_path_factory, examples=60)


@pytest.mark.slow
def test_fuzz_headers_long(micro, rlwe_keys, valid, tmp_path_factory):
    fuzz_headers_all(micro, rlwe_keys, valid, tmp_path_factory, examples=1500)
