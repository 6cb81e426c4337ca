"""``hetune serve``: the remote worker, a FastAPI app over one bundle.

It loads only the bundle (integer weights; no float model, no transformers or peft),
keeps one session per data owner (the uploaded compression key, a bearer token, an
idle TTL), checks op, direction, shape and body size against the manifest before any
heavy work, and answers every bad request with a 4xx JSON error. Logs carry method,
path, status, op, rows and timing: never a key, a token or a payload.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hetune.compile.bundle import Bundle
from hetune.crypto import glwe
from hetune.crypto.param_sets import DEFAULT_PARAM_SET, PARAM_SETS, ParamSet, param_set as lookup_param_set
from hetune.protocols.hybrid_lora import wire
from hetune.protocols.hybrid_lora.worker import GlweWorker
from hetune.protocols.http_api import LoopbackServer, add_access_log, error, read_body, session_or_error
from hetune.protocols.sessions import SessionLimitError, SessionStore

log = logging.getLogger("hetune.worker")



@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 8  # each holds a 128 MiB compression key
    session_ttl_s: float = 3600.0  # idle time before a session is dropped
    max_rows: int = 4096  # tokens per request


@dataclass
class Session:
    token: str
    compression_key: object
    params: ParamSet  # the data owner's GLWE parameter set (its privacy level)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(bundle: Bundle, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    worker = GlweWorker(bundle)
    sessions: SessionStore[Session] = SessionStore(cfg.max_sessions, cfg.session_ttl_s, log)
    manifest = bundle.manifest
    app = FastAPI(title="hetune worker", version=manifest.hetune_version)
    prefix = f"/{wire.API_VERSION}"

    add_access_log(app, log)

    @app.get(f"{prefix}/health")
    def health():
        return {"status": "ok", "sessions": len(sessions)}

    @app.get(f"{prefix}/info")
    def info():
        return {
            "api_version": wire.API_VERSION,
            "hetune_version": manifest.hetune_version,
            "manifest": manifest.to_dict(),
            "limits": {"max_rows": cfg.max_rows, "max_sessions": cfg.max_sessions, "session_ttl_s": cfg.session_ttl_s},
            "param_sets": list(PARAM_SETS),
        }

    @app.get(f"{prefix}/codec")
    def codec():
        """Public per-channel data the client needs to decode: scales and row sums of W_q."""
        from safetensors.torch import save

        tensors = {}
        for spec in manifest.ops:
            codec = bundle.op(spec.name).codec
            tensors[f"{spec.name}.scale"], tensors[f"{spec.name}.rowsum"] = codec.scale, codec.rowsum
            if codec.static_input is not None:  # the static ablation's fixed ranges
                tensors[f"{spec.name}.static_input"], tensors[f"{spec.name}.static_grad"] = codec.static_input, codec.static_grad
        return Response(save(tensors), media_type="application/octet-stream")

    @app.post(f"{prefix}/sessions", status_code=201)
    async def create_session(request: Request, param_set: str | None = None):
        # The set fixes the key's exact size; without a name, Concrete ML's default (p128) applies.
        param_set = DEFAULT_PARAM_SET if param_set is None else param_set
        if param_set not in PARAM_SETS:
            return error(422, f"param_set {param_set!r} is not allowed; choose one of {', '.join(PARAM_SETS)}")
        chosen = lookup_param_set(param_set)
        body = await read_body(request, chosen.compression_key_bytes)
        if isinstance(body, JSONResponse):
            return body
        if len(body) != chosen.compression_key_bytes:
            return error(400, f"a {param_set} compression key is {chosen.compression_key_bytes} bytes, got {len(body)}")
        try:
            key = glwe.load_compression_key(body)
        except BaseException as err:  # pyo3 panics derive from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            return error(400, "body is not a valid serialized compression key")
        try:
            sid, token = sessions.create(lambda token: Session(token, key, chosen))
        except SessionLimitError:
            return error(429, f"worker is at its limit of {cfg.max_sessions} sessions; close one or retry later")
        log.info("session %s created (%s)", sid[:8], param_set)
        return {"session_id": sid, "token": token, "ttl_s": cfg.session_ttl_s, "param_set": param_set}

    @app.delete(f"{prefix}/sessions/{{sid}}", status_code=204)
    def close_session(sid: str, request: Request):
        got = session_or_error(sessions, sid, request)
        if isinstance(got, JSONResponse):
            return got
        sessions.close(sid)
        return Response(status_code=204)

    @app.post(f"{prefix}/sessions/{{sid}}/ops/{{op}}/{{direction}}")
    async def run_op(sid: str, op: str, direction: str, request: Request, rows: int = 0, cols: int = 0):
        got = session_or_error(sessions, sid, request)
        if isinstance(got, JSONResponse):
            return got
        if op not in worker.weights:
            return error(404, f"unknown op {op!r}")
        if direction not in wire.DIRECTIONS:
            return error(404, f"unknown direction {direction!r}; use forward or backward")
        shape = worker.shape(op, direction)
        if cols != shape.cols:
            return error(422, f"{op} {direction} takes {shape.cols} columns, request says {cols}")
        if not 1 <= rows <= cfg.max_rows:
            return error(422, f"rows must be between 1 and {cfg.max_rows}, got {rows}")
        expected = wire.ciphertext_bytes(rows, cols, got.params.poly_size, got.params.glwe_bytes)
        body = await read_body(request, expected)
        if isinstance(body, JSONResponse):
            return body
        if len(body) != expected:
            return error(422, f"ciphertext of {rows}x{cols} must be {expected} bytes, got {len(body)} (truncated?)")
        from starlette.concurrency import run_in_threadpool

        def compute() -> bytes:
            with got.lock:  # one product at a time per session
                return worker.run(op, direction, body, got.compression_key)

        try:
            result = await run_in_threadpool(compute)
        except BaseException as err:  # a corrupt ciphertext makes the extension panic
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            return error(400, "ciphertext could not be deserialized or multiplied (corrupt payload?)")
        return Response(result, media_type="application/octet-stream")

    return app


class LoopbackWorker(LoopbackServer):
    """The worker app in a background thread on 127.0.0.1 (port chosen by the OS), for tests and the demo."""

    def __init__(self, bundle: Bundle, cfg: ServeConfig = ServeConfig(), start_timeout_s: float = 30.0):
        super().__init__(create_app(bundle, cfg), "worker", "hetune-worker", start_timeout_s)


def serve(bundle: Bundle, cfg: ServeConfig = ServeConfig()) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(bundle, cfg), host=cfg.host, port=cfg.port, log_level="warning")
