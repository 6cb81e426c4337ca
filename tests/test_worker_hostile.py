"""The worker and its owner-side client tried as an attacker would, on loopback (hardening, round 2).

Each test reproduces one finding against the real app or a real uvicorn server and checks
the fixed behaviour: admission on the routed path (a root path, crafted Host headers),
rate limits charged after authentication, status endpoints behind the key, a memory budget
for bodies in flight (held uploads, worker RSS measured), a refused non-loopback bind,
confined bundle file names, and an owner that survives oversized and malformed answers.
"""

import gzip
import json
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import psutil
import pytest
import torch
from fastapi.testclient import TestClient

from hetune.compile.bundle import MANIFEST_FILE, load_bundle
from hetune.crypto.keys import generate_keys
from hetune.crypto.registry import get_scheme
from hetune.crypto.rlwe_wire import REQUEST, Header
from hetune.errors import BundleError, WorkerError
from hetune.serving.admission import OwnerLimits, add_owner
from hetune.protocols.hybrid_lora.owner import remote
from hetune.protocols.hybrid_lora.owner.backends import EncryptedBackend
from hetune.protocols.hybrid_lora.worker.server import ServeConfig, create_app
from hetune.serving.http_api import LoopbackServer

OP = "layers.1.o"  # 32 x 32


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    return path, {owner: add_owner(path, owner) for owner in ("clinic", "bank")}


@pytest.fixture(scope="module")
def ciphertext(rlwe_keys):
    return rlwe_keys.encrypt(np.arange(32)[None, :] % 200)


def bearer(token):
    return {"authorization": f"Bearer {token}"}


def raw(port: int, head: str, body: bytes = b"", timeout: float = 20.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (any Host, framing headers), and the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


# ---- 1. admission on the routed path ----


def test_admission_holds_behind_a_root_path_and_crafted_host_headers(micro, keys_file):
    """Before: a middleware matched request.url.path, which a root path or a crafted Host changes, so keyless
    opens reached the handler, created sessions and filled the cap. Now a route dependency refuses them."""
    path, keys = keys_file
    app = create_app(micro, ServeConfig(api_keys=path, max_sessions=2))
    with LoopbackServer(app, "worker", "hostile-worker", root_path="/proxy") as server:
        port = port_of(server)
        answers = []
        for host in ("127.0.0.1", "evil.example/v2/x?y=", "a/?x=", "127.0.0.1/proxy", "[::1"):
            for target in ("/v2/sessions", "/proxy/v2/sessions", "/v2/sessions/", f"/v2/sessions/{'ab' * 16}/ops/{OP}/forward"):
                answers.append(raw(port, f"POST {target}?rows=1&cols=32 HTTP/1.1\r\nHost: {host}\r\n"
                                         "Content-Length: 0\r\nConnection: close\r\n\r\n"))
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {400, 401, 404}, statuses  # never a 201, a 500 or a 429
        assert statuses.count(401) >= 5  # each host's keyless open reached the routed check
        assert all(b"error" in body or b"Not Found" in body for _, body in answers)
        # nothing was created: the real owner gets both places of max_sessions=2
        for _ in range(2):
            status, body = raw(port, "POST /v2/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                                     f"Authorization: Bearer {keys['clinic']}\r\nConnection: close\r\n\r\n")
            assert status == 201, body
        status, body = raw(port, f"GET /v2/health HTTP/1.1\r\nHost: a/?x=\r\nAuthorization: Bearer {keys['bank']}\r\n"
                                 "Connection: close\r\n\r\n")
        assert status == 200 and json.loads(body)["sessions"] == 2


def test_starlette_is_past_the_host_header_advisory():
    """GHSA-86qp-5c8j-p5mr (CVE-2026-48710): before 1.0.1 a malformed Host rewrote request.url.path."""
    import starlette
    from packaging.version import Version
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient as StarletteClient

    assert Version(starlette.__version__) >= Version("1.0.1")
    app = Starlette(routes=[Route("/v2/x", lambda request: PlainTextResponse(request.url.path))])
    assert StarletteClient(app).get("/v2/x", headers={"host": "a/v2/y?z="}).text == "/v2/x"


# ---- 2. rate limits charged after authentication ----


def test_wrong_tokens_and_keys_cost_the_owner_nothing(micro, keys_file, ciphertext):
    path, keys = keys_file
    client = TestClient(create_app(micro, ServeConfig(api_keys=path, owner_limits=OwnerLimits(requests_per_minute=4))))
    s = client.post("/v2/sessions", headers=bearer(keys["clinic"])).json()  # clinic's request 1 of 4
    url = f"/v2/sessions/{s['session_id']}/ops/{OP}/forward"
    for headers in [bearer("wrong"), {}, bearer(keys["clinic"]), bearer(keys["bank"])] * 5:  # 20 tries without its token
        assert client.post(url, params={"rows": 1, "cols": 32}, content=ciphertext, headers=headers).status_code == 401
    for _ in range(10):
        assert client.post("/v2/sessions", headers=bearer("htk_" + "x" * 43)).status_code == 401
    for _ in range(3):  # requests 2-4: the floods were not charged to clinic
        assert client.post(url, params={"rows": 1, "cols": 32}, content=ciphertext, headers=bearer(s["token"])).status_code == 200
    r = client.post(url, params={"rows": 1, "cols": 32}, content=ciphertext, headers=bearer(s["token"]))
    assert r.status_code == 429 and "requests per minute" in r.json()["error"]  # its own requests do count


# ---- 3. status endpoints ----


def test_status_endpoints_need_a_key_when_keys_are_on(micro, keys_file):
    path, keys = keys_file
    closed = TestClient(create_app(micro, ServeConfig(api_keys=path)))
    opened = TestClient(create_app(micro, ServeConfig()))
    for route in ("/v2/health", "/v2/info", "/v2/codec"):
        for headers in ({}, bearer("htk_nope")):
            r = closed.get(route, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"], route
        assert closed.get(route, headers=bearer(keys["bank"])).status_code == 200
        assert opened.get(route).status_code == 200  # admission open: as before
    for client in (closed, opened):
        r = client.get("/v2/live")
        assert r.status_code == 200 and r.json() == {"status": "ok"}  # the liveness probe says nothing else


# ---- 4. bodies in flight ----


def test_a_body_over_the_budget_is_refused_before_it_is_read(micro, ciphertext):
    client = TestClient(create_app(micro, ServeConfig(max_rows=8192, body_budget_mib=1, owner_body_budget_mib=1)))
    app_budget = client.app.state.budget
    s = client.post("/v2/sessions").json()
    url, auth = f"/v2/sessions/{s['session_id']}/ops/{OP}/forward", bearer(s["token"])
    r = client.post(url, params={"rows": 8192, "cols": 32}, content=b"", headers=auth)  # 1.5 MiB > 1 MiB
    assert r.status_code == 413 and "--owner-body-budget-mib" in r.json()["error"]
    assert client.post(url, params={"rows": 1, "cols": 32}, content=ciphertext, headers=auth).status_code == 200
    assert app_budget.used == 0  # every hold was given back


def test_session_cap_is_checked_before_a_glwe_key_is_read(micro, keys_file):
    """Before: a GLWE open buffered its 128 MiB key, then found the cap full. Now the 429 (or 401) comes first."""
    path, keys = keys_file
    for cfg, headers, expected in ((ServeConfig(max_sessions=1), "", 429),
                                   (ServeConfig(api_keys=path), "Authorization: Bearer htk_wrong\r\n", 401)):
        app = create_app(micro, cfg)
        with LoopbackServer(app, "worker", "hostile-worker") as server:
            if expected == 429:
                assert TestClient(app).post("/v2/sessions").status_code == 201  # the only place is taken
            size = get_scheme("glwe").resolve(None).session_key_bytes
            start = time.monotonic()
            status, body = raw(port_of(server), f"POST /v2/sessions?scheme=glwe HTTP/1.1\r\nHost: x\r\n{headers}"
                                                f"Content-Length: {size}\r\nConnection: close\r\n\r\n")  # no body sent
            assert status == expected, body
            assert time.monotonic() - start < 10 and app.state.budget.used == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload(port: int, head: bytes, body_bytes: int) -> tuple[socket.socket | None, int | None]:
    """Send ``head``, then ``body_bytes`` zero bytes while listening: (the open socket, None) once all are sent
    without an answer (the worker is reading), or (None, status) if it answered first (None: it reset the link)."""
    import select

    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    conn.sendall(head)
    chunk, sent = bytes(2**20), 0
    if select.select([conn], [], [], 1.0)[0] == []:  # a refusal comes before any body is sent; give it a second
        while sent < body_bytes:
            readable, writable, _ = select.select([conn], [conn], [], 60)
            if readable:
                break
            try:
                sent += conn.send(chunk[: body_bytes - sent])
            except OSError:
                conn.close()
                return None, None
        else:
            return conn, None
    try:
        answer = conn.recv(4096)
        return None, int(answer.split()[1]) if answer else None
    except OSError:
        return None, None
    finally:
        conn.close()


def test_held_uploads_stay_within_the_body_budget(micro_bundle, rlwe_keys):
    """Twelve uploads of a 24 MiB body each, held after 90 % of it: unbudgeted they would pin ~260 MiB of the
    worker; with a 50 MiB budget two are read, ten are refused (429) before their bodies are read, the worker's
    RSS grows by at most the budget plus slack, and the two held are cut off by the body timeout (408)."""
    port, budget_mib, timeout_s, rows, cols = free_port(), 50, 10, 32768, 128  # layers.0.gate_up backward: 128 columns
    worker = subprocess.Popen([sys.executable, "-m", "hetune.cli", "serve", str(micro_bundle), "--port", str(port),
                               "--max-rows", str(rows), "--body-budget-mib", str(budget_mib), "--owner-body-budget-mib",
                               str(budget_mib), "--body-timeout", str(timeout_s)], stderr=subprocess.DEVNULL)
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        s = httpx.post(f"http://127.0.0.1:{port}/v2/sessions").json()
        size = get_scheme("rlwe").request_bytes(rlwe_keys.params, rows, cols)
        assert 24 * 2**20 < size < 25 * 2**20
        rss = psutil.Process(worker.pid)
        before = rss.memory_info().rss
        head = (f"POST /v2/sessions/{s['session_id']}/ops/layers.0.gate_up/backward?rows={rows}&cols={cols} HTTP/1.1\r\n"
                f"Host: x\r\nAuthorization: Bearer {s['token']}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n")
        header = Header(REQUEST, "rlwe", "p128", rows, cols, 6, bytes(16)).pack()  # then zeros: a well-formed request's shape
        held, refused = [], []
        for _ in range(12):
            started = time.monotonic()
            conn, status = upload(port, head.encode() + header, size * 9 // 10 - len(header))
            if conn is not None:
                held.append((conn, started))
            else:
                refused.append(status)
        time.sleep(0.5)  # let the worker take in what is on the wire
        peak = rss.memory_info().rss
        assert len(held) == 2 and len(refused) == 10 and set(refused) <= {429, None}, (len(held), refused)
        assert refused.count(429) >= 8  # a reset instead of the answer is rare, but allowed
        grown = (peak - before) / 2**20
        print(f"worker RSS {before / 2**20:.0f} -> {peak / 2**20:.0f} MiB with 2 uploads of {size / 2**20:.1f} MiB "
              f"held and 10 refused")
        assert grown < budget_mib + 40, f"worker RSS grew {grown:.0f} MiB under a {budget_mib} MiB body budget"
        for conn, started in held:
            conn.settimeout(timeout_s + 60)
            assert int(conn.recv(4096).split()[1]) == 408
            assert time.monotonic() - started >= timeout_s - 1
            conn.close()
        body = rlwe_keys.encrypt(np.ones((1, 32), dtype=np.int64))
        ok = httpx.post(f"http://127.0.0.1:{port}/v2/sessions/{s['session_id']}/ops/{OP}/forward",
                        params={"rows": 1, "cols": 32}, content=body, headers=bearer(s["token"]))
        assert ok.status_code == 200  # the budget was given back; the worker kept serving
    finally:
        worker.terminate()
        worker.wait(30)


def test_the_body_timeout_counts_the_clients_waits_not_the_workers_work():
    """A body sent at once is read whole however long the worker's on-arrival work takes (3 x 0.3 s against a
    0.5 s timeout); a body whose sender stalls for 1 s is cut off with a 408."""
    import asyncio

    from starlette.requests import Request

    from hetune.serving.http_api import read_body

    def request(pieces: list[bytes], stall_s: float) -> Request:
        messages = iter([{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)])

        async def receive():
            if stall_s:
                await asyncio.sleep(stall_s)
            return next(messages)

        return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)

    async def slow_work(piece: bytes) -> None:
        got.append(piece)
        await asyncio.sleep(0.3)

    got: list[bytes] = []
    assert asyncio.run(read_body(request([b"a", b"b", b"c"], 0.0), 10, 0.5, slow_work)) == b""
    assert b"".join(got) == b"abc"
    stalled = asyncio.run(read_body(request([b"a", b"b"], 1.0), 10, 0.5, slow_work))
    assert stalled.status_code == 408 and b"--body-timeout" in stalled.body


# ---- 5. a bind beyond loopback ----


def test_serve_beyond_loopback_needs_tls_and_keys_or_insecure(run_cli, micro_bundle, keys_file, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs["host"]))
    code, _, stderr = run_cli("serve", micro_bundle, "--host", "0.0.0.0")
    assert code == 2 and "refusing to listen on 0.0.0.0 without TLS" in stderr and "--api-keys" in stderr
    assert "--insecure" in stderr and not calls
    code, _, stderr = run_cli("serve", micro_bundle, "--host", "10.1.2.3", "--api-keys", keys_file[0])
    assert code == 2 and "without TLS (--tls-cert/--tls-key):" in stderr and not calls  # keys alone are not enough
    code, _, stderr = run_cli("serve", micro_bundle, "--host", "0.0.0.0", "--insecure")
    assert code == 0 and calls == ["0.0.0.0"]
    code, _, _ = run_cli("serve", micro_bundle, "--host", "::1")
    assert code == 0 and calls == ["0.0.0.0", "::1"]  # loopback needs neither


# ---- 6. bundle file names ----


@pytest.mark.parametrize("name", ["../weights.safetensors", "/etc/passwd", "sub/weights.safetensors", "..", "C:weights"])
def test_a_manifest_naming_files_outside_its_bundle_is_refused(micro_bundle, tmp_path, name):
    bundle = tmp_path / "bundle"
    shutil.copytree(micro_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["files"][name] = manifest["files"].pop("weights.safetensors")
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    (tmp_path / "weights.safetensors").write_bytes((micro_bundle / "weights.safetensors").read_bytes())  # the bait
    with pytest.raises(BundleError, match="not a plain file name in the bundle directory"):
        load_bundle(bundle)


# ---- 7. the owner against a hostile worker ----


@pytest.fixture
def fast_retry(monkeypatch):
    monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(retries=1, backoff_s=0.05, timeout_s=30.0))


@pytest.fixture
def tampering_worker(micro):
    """The real worker behind a middleware that, when told, replaces the answers of one kind of route."""
    from starlette.responses import Response

    app = create_app(micro, ServeConfig())
    tamper = {}

    @app.middleware("http")
    async def replace(request, call_next):
        response = await call_next(request)
        for fragment, make in tamper.items():
            if fragment in request.url.path:
                tamper["hits"] = tamper.get("hits", 0) + 1
                body, headers = make()
                return Response(body, status_code=200, headers=headers)
        return response

    with LoopbackServer(app, "worker", "tampering-worker") as server:
        yield server.url, tamper


def test_the_owner_turns_malformed_answers_into_worker_errors(tampering_worker, fast_retry, rlwe_keys, ciphertext):
    url, tamper = tampering_worker
    cases = {"/info": (b"<html>not json</html>", "malformed info"), "/codec": (b"\x00" * 64, "malformed codec"),
             "/sessions": (b'{"session_id": 5, "token": "t"}', "malformed session")}
    for fragment, (body, message) in cases.items():
        tamper.clear()
        tamper[fragment] = lambda body=body: (body, {})
        with pytest.raises(WorkerError, match=message):
            transport = remote.HttpTransport((url,))
            transport.codecs()
            transport.open(rlwe_keys.params, b"")


def test_oversized_and_compressed_bomb_answers_stop_at_the_cap(tampering_worker, fast_retry, rlwe_keys, ciphertext):
    url, tamper = tampering_worker
    transport = remote.HttpTransport((url,))
    transport.open(rlwe_keys.params, b"")
    cap = remote.RESULT_BYTES_FACTOR * get_scheme("rlwe").request_bytes(rlwe_keys.params, 1, 32) + 2**16
    bomb = gzip.compress(bytes(cap * 4))  # inflates to 4x the cap
    assert len(bomb) < cap // 100
    for body, headers in ((bytes(cap + 1), {}), (bomb, {"content-encoding": "gzip"})):
        tamper.clear()
        tamper["/ops/"] = lambda body=body, headers=headers: (body, headers)
        tracemalloc.start()  # Python's own allocations: RSS also moves with the allocator's arenas and earlier tests
        try:
            with pytest.raises(WorkerError, match=f"response of over {cap} bytes"):
                transport.run(OP, "forward", ciphertext, rows=1, cols=32)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert tamper["hits"] == 2  # asked once more, then a clear error
        assert peak < 2 * cap  # the bomb was never inflated whole (that alone is 4 x cap): at most the cap, then a step
    transport.close()


def test_a_malformed_result_is_asked_again_then_stops_training_with_the_checkpoint_intact(
        tampering_worker, fast_retry, run_cli, train_jsonl, tmp_path):
    url, tamper = tampering_worker
    args = ("train", "--model", "micro-llama", "--data", train_jsonl, "--out", tmp_path / "run", "--backend", "remote",
            "--worker", url, "--seq-len", "4", "--batch-size", "1", "--warmup-steps", "1", "--save-every", "1")
    code, _, stderr = run_cli(*args, "--steps", "1")
    assert code == 0, stderr
    checkpoint = tmp_path / "run" / "checkpoints"
    saved = {p: p.read_bytes() for p in (checkpoint / "step-1").rglob("*") if p.is_file()}
    tamper["/ops/"] = lambda: (b"HTRL" + bytes(200), {})  # a short body with a broken header
    code, _, stderr = run_cli(*args, "--steps", "2", "--resume")
    assert code == 6 and "is malformed, twice" in stderr and "--resume" in stderr, stderr
    assert tamper["hits"] == 2  # one retry of the same request, then a clean stop
    assert (checkpoint / "latest").read_text().strip() == "step-1" and not (checkpoint / "step-2").exists()
    assert saved and {p: p.read_bytes() for p in (checkpoint / "step-1").rglob("*") if p.is_file()} == saved


class GarbageTransport:
    """Answers every product with the same bytes (the EncryptedBackend's transport interface)."""

    name = "remote"

    def __init__(self, body: bytes):
        self.body, self.calls = body, 0

    def open(self, params, session_key):
        pass

    def in_features(self, op):
        return 32

    def run(self, op, direction, payload, rows, cols):
        self.calls += 1
        return self.body, 0.0


@pytest.mark.he
def test_a_malformed_glwe_result_is_a_worker_error_not_a_panic(micro):
    """Before: the extension's Rust panic (a BaseException) ended training uncaught."""
    transport = GarbageTransport(b"garbage" * 100)
    backend = EncryptedBackend({OP: micro.op(OP).codec}, transport, generate_keys("glwe"))
    with pytest.raises(WorkerError, match=f"result for {OP} forward .* is malformed, twice"):
        backend.forward(OP, torch.randn(2, 32, generator=torch.Generator().manual_seed(0)))
    assert transport.calls == 2
