"""FastAPI pieces shared by the core worker and the SFPrompt body server.

Both speak the same dialect: JSON ``{"error": ...}`` bodies with a 4xx status, bearer
tokens, request bodies capped before they are buffered (413) and read within a time
limit (408), sessions looked up as 404 unknown / 401 wrong token, and an access log of
method, path, status and timing with session ids masked: never a token or a payload.
Route dependencies refuse a request by raising :class:`Refusal`, so the check runs on
the routed path and the handler never starts. :class:`BodyBudget` bounds the bytes of
request bodies in flight (in this process, or across replicas sharing a ledger). Plus the loopback runner both use in tests and demos.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from hetune.serving.sessions import S, SessionStore


def error(status: int, message: str, retry_after_s: float | None = None) -> JSONResponse:
    response = JSONResponse({"error": message}, status_code=status)
    if retry_after_s is not None:
        response.headers["retry-after"] = str(max(1, math.ceil(retry_after_s)))
    return response


class Refusal(Exception):
    """A 4xx (or 503) answer raised by a route dependency or a handler; :func:`add_refusals` turns it into the response."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s

    def response(self) -> JSONResponse:
        return error(self.status, self.message, self.retry_after_s)


def add_refusals(app: FastAPI) -> None:
    async def refused(request: Request, exc: Refusal) -> JSONResponse:
        return exc.response()

    app.add_exception_handler(Refusal, refused)


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else None


async def read_body(request: Request, limit: int, timeout_s: float | None = None,
                    consume: Callable[[bytes], Awaitable[None]] | None = None) -> bytes | JSONResponse:
    """The body, or a 413 once the declared or streamed size passes ``limit`` (nothing more is buffered),
    or a 408 if it has not all arrived within ``timeout_s`` (a held upload gives its memory back).
    ``consume``: each piece goes to it as it arrives and b"" is returned; what it raises comes out of here.
    ``timeout_s`` counts only the waits for the client's bytes, not ``consume``'s work: a worker slowed by
    its own multiplying (or a busy CPU) does not cut off an owner that sends at full speed."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return error(413, f"request body too large (limit {limit} bytes)")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout_s) as clock:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    return error(413, f"request body too large (limit {limit} bytes)")
                if consume is None:
                    chunks.append(chunk)
                else:
                    await _unclocked(clock, consume(chunk))
    except TimeoutError:
        return error(408, f"request body not received within {timeout_s:g} s; send it at once, or raise --body-timeout")
    except ClientDisconnect:  # the client left mid-body: nobody reads this answer, but no traceback either
        return error(400, "the client disconnected before its body was complete")
    return b"".join(chunks)


async def _unclocked(clock: asyncio.Timeout, work: Awaitable[None]) -> None:
    """Await ``work`` with ``clock`` stopped: its deadline moves on by the time the work took."""
    deadline = clock.when()
    if deadline is None:
        return await work
    loop = asyncio.get_running_loop()
    left = deadline - loop.time()
    clock.reschedule(None)
    try:
        await work
    finally:
        clock.reschedule(loop.time() + left)


class SharedBodies(Protocol):
    """Where the replicas of one app agree on their bodies' bytes (on Ray Serve, the app's ledger actor)."""

    def reserve(self, holder: str, size: int, total: int, per_holder: int) -> str | None: ...

    def release(self, holder: str, size: int) -> None: ...

    def renew(self, held: Mapping[str, int]) -> None: ...


class BodyBudget:
    """Bytes of request bodies in flight, in all and per holder (an owner, or a session when admission is open).

    Why: a body is buffered whole (or an RLWE product keeps its sums) until its answer, so without a budget N held
    uploads cost N bodies of memory. A request holds its body's size from before the read
    until its answer is ready; one that does not fit now gets a 429 (its holder's share is
    taken) or a 503 (the worker's is), both with ``Retry-After``, before a byte is read.
    With ``shared`` (replicas behind one endpoint) a hold must also fit the budget all
    replicas share; :meth:`renew` then re-reports this replica's holds, which keeps them alive.
    """

    RETRY_S = 1

    def __init__(self, total: int, per_holder: int, options: str = "--owner-body-budget-mib / --body-budget-mib",
                 shared: SharedBodies | None = None):
        """``options``: the server's settings that raise the budgets, named in a 413."""
        self.total, self.per_holder, self._options, self._shared = total, per_holder, options, shared
        self._used, self._by_holder = 0, Counter()
        self._lock = threading.Lock()

    def _refusal(self, full: str) -> Refusal:
        if full == "holder":
            return Refusal(429, "too many request bytes in flight for this owner; wait for earlier requests", self.RETRY_S)
        return Refusal(503, "worker busy: its budget for request bodies in flight is taken; retry shortly", self.RETRY_S)

    @contextmanager
    def hold(self, holder: str, size: int) -> Iterator[None]:
        """Sync: with ``shared`` it waits for the ledger, so async callers enter it in a thread."""
        if size > min(self.total, self.per_holder):
            raise Refusal(413, f"a {size}-byte body exceeds the server's body budget ({self.per_holder} bytes per holder, "
                               f"{self.total} in all); send fewer rows per request, or ask the operator to raise {self._options}")
        with self._lock:  # also orders this replica's calls to the shared ledger
            if self._by_holder[holder] + size > self.per_holder:
                raise self._refusal("holder")
            if self._used + size > self.total:
                raise self._refusal("total")
            full = self._shared.reserve(holder, size, self.total, self.per_holder) if self._shared and size else None
            if full:
                raise self._refusal(full)
            self._used += size
            self._by_holder[holder] += size
        try:
            yield
        finally:
            with self._lock:
                self._used -= size
                self._by_holder[holder] -= size
                if not self._by_holder[holder]:
                    del self._by_holder[holder]
                if self._shared and size:
                    self._shared.release(holder, size)

    def renew(self) -> None:
        """Tell the shared ledger what this replica holds now (it forgets a replica that stops saying)."""
        with self._lock:
            self._shared.renew(dict(self._by_holder))

    @property
    def used(self) -> int:
        return self._used


def require_session(store: SessionStore[S], sid: str, request: Request) -> S:
    """The session named in the path if the request's bearer token is its own; else a Refusal (404 or 401)."""
    got = store.get(sid, bearer(request))
    if got is None:
        raise Refusal(404, "unknown or expired session")
    if got is False:
        raise Refusal(401, "missing or wrong bearer token")
    return got


def session_or_error(store: SessionStore[S], sid: str, request: Request) -> S | JSONResponse:
    """:func:`require_session` for handlers that answer in-line: a 404 or 401 response instead of a Refusal."""
    try:
        return require_session(store, sid, request)
    except Refusal as refusal:
        return refusal.response()


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
                 tls: tuple[Path, Path] | None = None, root_path: str = ""):
        """``tls``: (certificate, private key) PEM files to serve https instead of http; ``root_path``: the
        prefix a reverse proxy would add (uvicorn's ``--root-path``)."""
        import uvicorn

        cert, key = (str(tls[0]), str(tls[1])) if tls else (None, None)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    ssl_certfile=cert, ssl_keyfile=key, root_path=root_path))
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
