"""FastAPI pieces shared by the core worker and the SFPrompt body server.

Both speak the same dialect: JSON ``{"error": ...}`` bodies with a 4xx status, bearer
tokens, request bodies capped before they are buffered (413), sessions looked up as
404 unknown / 401 wrong token, and an access log of method, path, status and timing
with session ids masked: never a token or a payload. Plus the loopback runner both
use in tests and demos.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hetune.serving.sessions import S, SessionStore


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else None


async def read_body(request: Request, limit: int) -> bytes | JSONResponse:
    """The body, or a 413 once the declared or streamed size passes ``limit`` (nothing more is buffered)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return error(413, f"request body too large (limit {limit} bytes)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return error(413, f"request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def session_or_error(store: SessionStore[S], sid: str, request: Request) -> S | JSONResponse:
    """The session named in the path if the request's bearer token is its own, else a 404 or 401."""
    got = store.get(sid, bearer(request))
    if got is None:
        return error(404, "unknown or expired session")
    if got is False:
        return error(401, "missing or wrong bearer token")
    return got


def add_access_log(app: FastAPI, log: logging.Logger) -> None:
    """Log each request's method, path (session ids masked), status and time."""

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        path = request.url.path.split("/sessions/")[0] + ("/sessions/..." if "/sessions/" in request.url.path else "")
        log.info("%s %s -> %d in %.3fs", request.method, path, response.status_code, time.perf_counter() - start)
        return response


class LoopbackServer:
    """An app served by uvicorn in a background thread on 127.0.0.1 (port chosen by the OS), for tests and demos."""

    def __init__(self, app: FastAPI, what: str, thread_name: str, start_timeout_s: float = 30.0,
                 tls: tuple[Path, Path] | None = None):
        """``tls``: (certificate, private key) PEM files to serve https instead of http."""
        import uvicorn

        cert, key = (str(tls[0]), str(tls[1])) if tls else (None, None)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    ssl_certfile=cert, ssl_keyfile=key))
        self.thread = threading.Thread(target=self.server.run, name=thread_name, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the loopback {what} did not start")
            time.sleep(0.02)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
