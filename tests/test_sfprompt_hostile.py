"""The SFPrompt body server under held uploads: its memory budget for bodies in flight holds, and it keeps serving.

Against the real server (uvicorn on loopback) with raw sockets that declare a body and send
only part of it, as an attacker holding memory would.
"""

from __future__ import annotations

import socket
import time

import httpx
import torch

from hetune.protocols.sfprompt import wire
from hetune.protocols.sfprompt.body_client import BodyClient
from hetune.protocols.sfprompt.body_server import BodyServeConfig, BodyService, LoopbackBodyServer
from hetune.protocols.sfprompt.split import body_stack

TOKEN = "test-admission-token"
HELD = 700_000  # bytes declared by each held upload: one fits a session's 1 MiB, two fit the server's 2 MiB, three do not


def _upload(url: str, path: str, token: str, declared: int, sent: int = 1000) -> socket.socket:
    """A POST that declares ``declared`` body bytes and sends only ``sent`` of them."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST {path}?step=1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: {wire.MEDIA_TYPE}\r\nContent-Length: {declared}\r\n\r\n".encode() + b"\0" * sent)
    return sock


def _status(sock: socket.socket) -> int:
    with sock:
        head = sock.recv(4096).split(b"\r\n", 1)[0]  # b"HTTP/1.1 429 Too Many Requests"
    return int(head.split()[1])


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_held_uploads_stay_within_the_body_budget_and_the_server_keeps_serving():
    body = body_stack("tiny-vit", 0, (1, 1))
    cfg = BodyServeConfig(max_rows=2048, body_budget_mib=2, session_body_budget_mib=1, body_timeout_s=2.0)
    with LoopbackBodyServer(BodyService(body, 48, TOKEN, cfg)) as server:
        budget = server.server.config.app.state.budget
        links = [BodyClient(server.url, TOKEN) for _ in range(3)]
        for link in links:
            link.open()
        path = [f"/{wire.API_VERSION}/sessions/{link.session_id}/forward" for link in links]

        # Unauthenticated uploads hold nothing: a wrong token is refused before the budget is touched.
        assert _status(_upload(server.url, path[0], "wrong", HELD)) == 401 and budget.used == 0
        held = [_upload(server.url, path[0], links[0]._token, HELD), _upload(server.url, path[1], links[1]._token, HELD)]
        _wait_for(lambda: budget.used == 2 * HELD)
        assert _status(_upload(server.url, path[0], links[0]._token, HELD)) == 429  # session 1's share is taken
        assert _status(_upload(server.url, path[2], links[2]._token, HELD)) == 503  # the server's is
        assert _status(_upload(server.url, path[2], links[2]._token, 2_000_000)) == 413  # over the body limit
        assert budget.used == 2 * HELD

        # Still serving: a legitimate forward fits beside the held uploads and is exact.
        h = torch.randn(2, 21, 48)
        torch.testing.assert_close(links[2].forward(h, 1, keep=False), body(h), rtol=1e-5, atol=1e-5)

        # The held uploads are cut off at the body timeout (408) and give their budget back.
        assert [_status(sock) for sock in held] == [408, 408]
        _wait_for(lambda: budget.used == 0)
        torch.testing.assert_close(links[0].forward(h, 2, keep=False), body(h), rtol=1e-5, atol=1e-5)
        assert httpx.get(f"{server.url}/{wire.API_VERSION}/health").json()["sessions"] == 3
        for link in links:
            link.close()
