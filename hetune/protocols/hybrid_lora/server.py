"""``hetune serve``: the remote worker, a FastAPI app over one bundle.

It loads only the bundle (integer weights; no float model, no transformers or peft),
keeps one session per data owner (its scheme and parameter set, a bearer token, an
idle TTL, and whatever key the scheme needs: none for batched RLWE, a compression key
for GLWE), checks op, direction, shape, header and body size before any heavy work,
and answers every bad request with a 4xx JSON error. Logs carry method, path, status
and timing: never a key, a token or a payload.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hetune.compile.bundle import Bundle
from hetune.crypto.scheme import ParamSet, PayloadError, get_scheme, scheme_names
from hetune.errors import ConfigError
from hetune.protocols.hybrid_lora import wire
from hetune.protocols.hybrid_lora.worker import Worker
from hetune.protocols.http_api import LoopbackServer, add_access_log, error, read_body, session_or_error
from hetune.protocols.sessions import SessionLimitError, SessionStore

log = logging.getLogger("hetune.worker")



@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 8  # a GLWE session holds a 128 MiB compression key; an RLWE one nothing
    session_ttl_s: float = 3600.0  # idle time before a session is dropped
    max_rows: int = 4096  # tokens per request


@dataclass
class Session:
    token: str
    params: ParamSet  # the data owner's scheme and parameter set (its privacy level)
    state: object  # the scheme's per-session state (GLWE: the compression key; RLWE: None)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(bundle: Bundle, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    worker = Worker(bundle)
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
            "default": manifest.crypto,
            "schemes": {name: {"param_sets": list(get_scheme(name).param_sets), "default": get_scheme(name).default_param_set}
                        for name in scheme_names()},
            "device": worker.device,
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
    async def create_session(request: Request, scheme: str | None = None, param_set: str | None = None):
        # Without names, the bundle's scheme and set apply; the body is the scheme's session key (RLWE: empty).
        scheme = scheme or manifest.crypto["scheme"]
        if param_set is None and scheme == manifest.crypto["scheme"]:
            param_set = manifest.crypto["param_set"]
        try:
            chosen = get_scheme(scheme).resolve(param_set)
        except ConfigError as err:
            return error(422, f"{err.message}; {err.hint}")
        problems = manifest.problems(chosen)
        if problems:
            return error(422, f"this bundle cannot run under {scheme}/{chosen.name}: {problems[0]}")
        body = await read_body(request, chosen.session_key_bytes)
        if isinstance(body, JSONResponse):
            return body
        try:
            state = get_scheme(scheme).open_session(chosen, body)
        except PayloadError as err:
            return error(err.status, err.message)
        try:
            sid, token = sessions.create(lambda token: Session(token, chosen, state))
        except SessionLimitError:
            return error(429, f"worker is at its limit of {cfg.max_sessions} sessions; close one or retry later")
        log.info("session %s created (%s/%s)", sid[:8], scheme, chosen.name)
        return {"session_id": sid, "token": token, "ttl_s": cfg.session_ttl_s, "scheme": scheme, "param_set": chosen.name}

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
        params = got.params
        scheme = get_scheme(params.scheme)
        body = await read_body(request, scheme.request_bytes(params, rows, cols))
        if isinstance(body, JSONResponse):
            return body
        try:
            scheme.check_request(params, body, rows, cols)  # header and exact size, before any heavy work
        except PayloadError as err:
            return error(err.status, err.message)
        from starlette.concurrency import run_in_threadpool

        def compute() -> tuple[bytes, float]:
            with got.lock:  # one product at a time per session
                t0 = time.perf_counter()
                return worker.run(op, direction, params, got.state, body), time.perf_counter() - t0

        try:
            result, seconds = await run_in_threadpool(compute)
        except PayloadError as err:  # e.g. a GLWE ciphertext the extension cannot read
            return error(err.status, err.message)
        return Response(result, media_type="application/octet-stream", headers={"x-worker-seconds": f"{seconds:.6f}"})

    return app


class LoopbackWorker(LoopbackServer):
    """The worker app in a background thread on 127.0.0.1 (port chosen by the OS), for tests and the demo."""

    def __init__(self, bundle: Bundle, cfg: ServeConfig = ServeConfig(), start_timeout_s: float = 30.0):
        super().__init__(create_app(bundle, cfg), "worker", "hetune-worker", start_timeout_s)


def serve(bundle: Bundle, cfg: ServeConfig = ServeConfig()) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(bundle, cfg), host=cfg.host, port=cfg.port, log_level="warning")
