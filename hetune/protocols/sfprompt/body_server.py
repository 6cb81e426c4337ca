"""The body server: frozen middle blocks behind a small HTTP API, plain float, no crypto.

It sees the smashed data (head activations, prompts included) and the gradient at the
body output; never raw inputs, labels, prompts or tail weights. A forward keeps its
input and output until the matching backward (same session, same step), so the
backward differentiates exactly the activations it was given; pending forwards are
bounded per session, the oldest dropped first. Bad requests get a 4xx JSON error and
the server keeps serving. Logs carry method, path, status and timing, never payloads.

Deliberately close to the core worker (hybrid_lora/worker/server.py), and sharing its session
store (serving/sessions.py) and HTTP helpers (serving/http_api.py): bearer-token
sessions with an idle TTL, body-size limits, a memory budget for bodies in flight
(in all and per session, :class:`~hetune.serving.http_api.BodyBudget`: 429/503 before a
byte is read), a body read timeout, shape checks before compute. The core
worker's sessions hold a GLWE compression key; these hold pending activations (see
docs/sfprompt.md).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from hetune.errors import ConfigError
from hetune.serving.http_api import (BodyBudget, LoopbackServer, add_access_log, add_refusals, bearer, error, read_body,
                                     session_or_error)
from hetune.serving.sessions import SessionLimitError, SessionStore
from hetune.protocols.sfprompt import wire
from hetune.protocols.sfprompt.split import BlockStack

log = logging.getLogger("hetune.sfprompt.body")
MIB = 2**20


@dataclass(frozen=True)
class BodyServeConfig:
    max_sessions: int = 64
    session_ttl_s: float = 900.0
    max_pending: int = 4  # forwards awaiting their backward, per session
    max_rows: int = 65536  # batch x sequence positions in one request
    # Request bodies in flight (bytes held from before a body is read until its answer is ready),
    # as on the core worker (hetune.serving.http_api.BodyBudget):
    body_budget_mib: int = 1024  # in all
    session_body_budget_mib: int = 512  # per session: a 65,536-row float32 body of width 768 is 192 MiB
    body_timeout_s: float = 120.0  # to receive one body; a held upload is cut off (408) and gives its budget back

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_pending", "max_rows", "session_body_budget_mib"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive {name}")
        if self.body_budget_mib < self.session_body_budget_mib or self.body_timeout_s <= 0:
            raise ConfigError(f"body budgets {self.body_budget_mib} MiB in all / {self.session_body_budget_mib} MiB per session "
                              f"and body_timeout_s={self.body_timeout_s} are out of range",
                              "pass 1 <= session_body_budget_mib <= body_budget_mib and a positive body_timeout_s")


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
        self.closed_bytes = {"in": 0, "out": 0}  # of sessions already closed or expired
        self.sessions: SessionStore[BodySession] = SessionStore(
            cfg.max_sessions, cfg.session_ttl_s, log, on_drop=self._count_closed)

    def admit(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self._access_token.encode())  # bytes: a header may hold non-ASCII

    def _count_closed(self, session: BodySession) -> None:
        """Called by the store as a session closes or expires, so total_bytes still counts it."""
        self.closed_bytes["in"] += session.bytes_in
        self.closed_bytes["out"] += session.bytes_out

    def total_bytes(self) -> dict[str, int]:
        live = self.sessions.values()
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
    cfg = service.cfg
    # dtype width x rows x hidden, plus the safetensors header
    body_limit = 8 * cfg.max_rows * service.hidden + 4096
    budget = BodyBudget(cfg.body_budget_mib * MIB, cfg.session_body_budget_mib * MIB,
                        "BodyServeConfig.session_body_budget_mib / body_budget_mib")
    app.state.budget = budget

    add_refusals(app)
    add_access_log(app, log)

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
        try:
            sid, token = service.sessions.create(BodySession)
        except SessionLimitError:
            return error(429, f"body server is at its limit of {service.cfg.max_sessions} sessions; retry later")
        log.info("session %s created", sid[:8])
        return {"session_id": sid, "token": token, "ttl_s": service.cfg.session_ttl_s}

    @app.delete(f"{prefix}/sessions/{{sid}}", status_code=204)
    def close_session(sid: str, request: Request):
        got = session_or_error(service.sessions, sid, request)
        if isinstance(got, JSONResponse):
            return got
        service.sessions.close(sid)
        return Response(status_code=204)

    @app.post(f"{prefix}/sessions/{{sid}}/{{direction}}")
    async def run(sid: str, direction: str, request: Request, step: int = -1, keep: bool = True):
        got = session_or_error(service.sessions, sid, request)
        if isinstance(got, JSONResponse):
            return got
        if direction not in ("forward", "backward"):
            return error(404, f"unknown direction {direction!r}; use forward or backward")
        if step < 0:
            return error(422, "query parameter step (>= 0) is required")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > body_limit):
            return error(413, f"request body too large (limit {body_limit} bytes)")
        size = body_limit if declared is None else int(declared)  # a body longer than it says is cut off (413)
        with budget.hold(sid, size):  # held until the answer is ready: the body and its tensor live that long
            return await _run(got, direction, request, step, keep, size)

    async def _run(got: BodySession, direction: str, request: Request, step: int, keep: bool, size: int):
        body = await read_body(request, size, cfg.body_timeout_s)
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


class LoopbackBodyServer(LoopbackServer):
    """The body app in a background thread on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self, service: BodyService, start_timeout_s: float = 30.0):
        self.service = service
        super().__init__(create_body_app(service), "body server", "hetune-sfprompt-body", start_timeout_s)
