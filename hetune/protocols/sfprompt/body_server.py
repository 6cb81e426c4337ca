"""The body server: frozen middle blocks behind a small HTTP API, plain float, no crypto.

It sees the smashed data (head activations, prompts included) and the gradient at the
body output; never raw inputs, labels, prompts or tail weights. A forward keeps its
input and output until the matching backward (same session, same step), so the
backward differentiates exactly the activations it was given; pending forwards are
bounded per session, the oldest dropped first. Bad requests get a 4xx JSON error and
the server keeps serving. Logs carry method, path, status and timing, never payloads.

Deliberately close to the core worker (hybrid_lora/server.py): bearer-token sessions
with an idle TTL, body-size limits, shape checks before compute. The core SessionStore
holds a GLWE compression key; this one holds pending activations (see docs/sfprompt.md).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from hetune.errors import ConfigError
from hetune.protocols.sfprompt import wire
from hetune.protocols.sfprompt.split import BlockStack

log = logging.getLogger("hetune.sfprompt.body")


@dataclass(frozen=True)
class BodyServeConfig:
    max_sessions: int = 64
    session_ttl_s: float = 900.0
    max_pending: int = 4  # forwards awaiting their backward, per session
    max_rows: int = 65536  # batch x sequence positions in one request

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_pending", "max_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive {name}")


@dataclass
class BodySession:
    token: str
    pending: OrderedDict = field(default_factory=OrderedDict)  # step -> (input leaf, output)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    bytes_in: int = 0  # request bodies received
    bytes_out: int = 0  # response bodies sent


class BodyService:
    """The body and its sessions, independent of HTTP (the app is a thin layer over it)."""

    def __init__(self, body: BlockStack, hidden: int, access_token: str, cfg: BodyServeConfig = BodyServeConfig()):
        self.body, self.hidden, self.cfg = body, hidden, cfg
        self.dtype = next(body.parameters()).dtype
        self._access_token = access_token
        self.sessions: dict[str, BodySession] = {}
        self.closed_bytes = {"in": 0, "out": 0}  # of sessions already closed or expired
        self._lock = threading.Lock()

    def admit(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self._access_token)

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for sid in [s for s, v in self.sessions.items() if now - v.last_used > self.cfg.session_ttl_s]:
                self._drop(sid)
                log.info("session %s expired", sid[:8])

    def _drop(self, sid: str) -> None:
        session = self.sessions.pop(sid)
        self.closed_bytes["in"] += session.bytes_in
        self.closed_bytes["out"] += session.bytes_out

    def create(self) -> tuple[str, str] | None:
        self.expire()
        with self._lock:
            if len(self.sessions) >= self.cfg.max_sessions:
                return None
            sid, token = secrets.token_hex(16), secrets.token_urlsafe(32)
            self.sessions[sid] = BodySession(token)
        return sid, token

    def get(self, sid: str, token: str | None) -> BodySession | None | bool:
        """The session; None if unknown; False if the token is wrong."""
        self.expire()
        session = self.sessions.get(sid)
        if session is None:
            return None
        if token is None or not hmac.compare_digest(session.token, token):
            return False
        session.last_used = time.monotonic()
        return session

    def close(self, sid: str) -> None:
        with self._lock:
            if sid in self.sessions:
                self._drop(sid)

    def total_bytes(self) -> dict[str, int]:
        with self._lock:
            live = list(self.sessions.values())
        return {"in": self.closed_bytes["in"] + sum(s.bytes_in for s in live),
                "out": self.closed_bytes["out"] + sum(s.bytes_out for s in live)}

    def check_activations(self, h: torch.Tensor) -> str | None:
        if h.dim() != 3 or h.shape[-1] != self.hidden:
            return f"expected (batch, positions, {self.hidden}) activations, got {tuple(h.shape)}"
        if h.dtype != self.dtype:
            return f"expected {self.dtype} activations, got {h.dtype}"
        if h.shape[0] * h.shape[1] > self.cfg.max_rows:
            return f"{h.shape[0]}x{h.shape[1]} positions exceed the limit of {self.cfg.max_rows}"
        if not torch.isfinite(h).all():
            return "activations contain NaN or infinity"
        return None

    def forward(self, session: BodySession, step: int, h: torch.Tensor, keep: bool) -> torch.Tensor:
        """Body output; with ``keep`` the graph waits for the backward of the same step."""
        if not keep:
            with torch.no_grad():
                return self.body(h)
        leaf = h.requires_grad_(True)
        with torch.enable_grad():
            out = self.body(leaf)
        session.pending[step] = (leaf, out)
        while len(session.pending) > self.cfg.max_pending:
            session.pending.popitem(last=False)
        return out.detach()

    def backward(self, session: BodySession, step: int, grad: torch.Tensor) -> torch.Tensor:
        leaf, out = session.pending.pop(step)
        (grad_in,) = torch.autograd.grad(out, leaf, grad)  # frozen weights: input gradient only
        return grad_in


def create_body_app(service: BodyService) -> FastAPI:
    app = FastAPI(title="hetune sfprompt body server")
    prefix = f"/{wire.API_VERSION}"
    # dtype width x rows x hidden, plus the safetensors header
    body_limit = 8 * service.cfg.max_rows * service.hidden + 4096

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def bearer(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    async def read_body(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > body_limit):
            return error(413, f"request body too large (limit {body_limit} bytes)")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > body_limit:
                return error(413, f"request body too large (limit {body_limit} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        path = request.url.path.split("/sessions/")[0] + ("/sessions/..." if "/sessions/" in request.url.path else "")
        log.info("%s %s -> %d in %.3fs", request.method, path, response.status_code, time.perf_counter() - start)
        return response

    @app.get(f"{prefix}/health")
    def health():
        return {"status": "ok", "sessions": len(service.sessions)}

    @app.get(f"{prefix}/info")
    def info():
        return {"api_version": wire.API_VERSION, "hidden": service.hidden, "dtype": str(service.dtype).removeprefix("torch."),
                "blocks": len(service.body), "limits": {"max_rows": service.cfg.max_rows, "max_pending": service.cfg.max_pending}}

    @app.post(f"{prefix}/sessions", status_code=201)
    def create_session(request: Request):
        if not service.admit(bearer(request)):
            return error(401, "missing or wrong access token")
        created = service.create()
        if created is None:
            return error(429, f"body server is at its limit of {service.cfg.max_sessions} sessions; retry later")
        log.info("session %s created", created[0][:8])
        return {"session_id": created[0], "token": created[1], "ttl_s": service.cfg.session_ttl_s}

    @app.delete(f"{prefix}/sessions/{{sid}}", status_code=204)
    def close_session(sid: str, request: Request):
        got = service.get(sid, bearer(request))
        if got is None:
            return error(404, "unknown or expired session")
        if got is False:
            return error(401, "missing or wrong bearer token")
        service.close(sid)
        return Response(status_code=204)

    @app.post(f"{prefix}/sessions/{{sid}}/{{direction}}")
    async def run(sid: str, direction: str, request: Request, step: int = -1, keep: bool = True):
        got = service.get(sid, bearer(request))
        if got is None:
            return error(404, "unknown or expired session")
        if got is False:
            return error(401, "missing or wrong bearer token")
        if direction not in ("forward", "backward"):
            return error(404, f"unknown direction {direction!r}; use forward or backward")
        if step < 0:
            return error(422, "query parameter step (>= 0) is required")
        body = await read_body(request)
        if not isinstance(body, bytes):
            return body
        got.bytes_in += len(body)
        name = "h" if direction == "forward" else "g"
        try:
            tensor = wire.unpack(name, body)
        except wire.WireFormatError as err:
            return error(400, f"malformed {direction} payload: {err}")
        problem = service.check_activations(tensor)
        if problem:
            return error(422, problem)

        def compute() -> bytes:
            with got.lock:  # one request at a time per session; pending state stays consistent
                if direction == "forward":
                    return wire.pack("h", service.forward(got, step, tensor, keep))
                if step not in got.pending:
                    raise KeyError(step)
                leaf_shape = got.pending[step][1].shape
                if tuple(tensor.shape) != tuple(leaf_shape):
                    raise ValueError(f"gradient shape {tuple(tensor.shape)} does not match forward output {tuple(leaf_shape)}")
                return wire.pack("g", service.backward(got, step, tensor))

        try:
            result = await run_in_threadpool(compute)
        except KeyError:
            return error(409, f"no pending forward for step {step} (never sent, already used, or evicted)")
        except ValueError as err:
            return error(422, str(err))
        got.bytes_out += len(result)
        return Response(result, media_type=wire.MEDIA_TYPE)

    return app


class LoopbackBodyServer:
    """The body app in a background thread on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self, service: BodyService, start_timeout_s: float = 30.0):
        import uvicorn

        self.service = service
        self.server = uvicorn.Server(uvicorn.Config(create_body_app(service), host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="hetune-sfprompt-body", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the loopback body server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "LoopbackBodyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
