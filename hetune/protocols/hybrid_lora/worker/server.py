"""``hetune serve``: the remote worker, a FastAPI app over one bundle.

It loads only the bundle (integer weights; no float model, no transformers or peft),
keeps one session per data owner (its scheme and parameter set, a bearer token, an
idle TTL, and whatever key the scheme needs: none for batched RLWE, a compression key
for GLWE), checks op, direction, shape, header and body size before any heavy work,
and answers every bad request with a 4xx JSON error. Logs carry method, path, status
and timing: never a key, a token or a payload. On a network it serves https
(``tls_cert``/``tls_key``) and admits data owners by API key with per-owner limits
(``api_keys``, :mod:`hetune.serving.admission`); without keys it is open, and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hetune.compile.bundle import Bundle
from hetune.crypto.scheme import ParamSet, PayloadError
from hetune.crypto.registry import get_scheme, scheme_names
from hetune.errors import ConfigError
from hetune.protocols.hybrid_lora import wire
from hetune.serving.admission import OPEN_ADMISSION, Admission, OwnerLimits, read_keys_file
from hetune.protocols.hybrid_lora.worker.runner import OpRunner, Worker
from hetune.serving.http_api import LoopbackServer, add_access_log, error, read_body, session_or_error
from hetune.serving.sessions import SessionLimitError, SessionStore
from hetune.serving.signed_sessions import SignedSessions

log = logging.getLogger("hetune.worker")



@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    max_sessions: int = 8  # a GLWE session holds a 128 MiB compression key; an RLWE one nothing
    session_ttl_s: float = 3600.0  # idle time before a session is dropped
    max_rows: int = 4096  # tokens per request
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key the worker serves https
    tls_key: Path | None = None
    api_keys: Path | None = None  # `owner sha256hex` lines; None: admission open (loopback, development)
    owner_limits: OwnerLimits = OwnerLimits()  # per API-key owner; apply only with api_keys

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together", "pass both PEM files (certificate chain and its private key)")
        if self.tls_cert is not None:
            import ssl

            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"cannot use --tls-cert {self.tls_cert} with --tls-key {self.tls_key}: {err}",
                                  "pass a PEM certificate (chain) and the private key that matches it") from err

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.host}:{self.port}"


@dataclass
class Session:
    token: str
    params: ParamSet  # the data owner's scheme and parameter set (its privacy level)
    state: object  # the scheme's per-session state (GLWE: the compression key; RLWE: None)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(bundle: Bundle, cfg: ServeConfig = ServeConfig(), worker: OpRunner | None = None,
               sessions: SignedSessions[Session] | None = None) -> FastAPI:
    """``worker`` computes the products (default: this process, on ``bundle``'s weights); ``sessions``
    in signed tokens let replicas share them (``hetune serve --ray``), else they live in this process."""
    worker = worker or Worker(bundle)
    if sessions is None:  # not `or`: an empty store is falsy
        sessions = SessionStore(cfg.max_sessions, cfg.session_ttl_s, log)
    manifest = bundle.manifest
    app = FastAPI(title="hetune worker", version=manifest.hetune_version)
    prefix = f"/{wire.API_VERSION}"

    admission = None
    if cfg.api_keys is not None:
        admission = Admission(read_keys_file(cfg.api_keys), cfg.owner_limits, f"{prefix}/sessions", sessions.__contains__)

        @app.middleware("http")
        async def admit(request: Request, call_next):  # added before the access log, so refusals are logged too
            return admission.check(request) or await call_next(request)

    app.state.admission = admission
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
            "default": asdict(manifest.crypto),
            "schemes": {name: {"param_sets": list(get_scheme(name).param_sets), "default": get_scheme(name).default_param_set}
                        for name in scheme_names()},
            "device": worker.device,
        }

    @app.get(f"{prefix}/codec")
    def codec():
        """Public per-channel data the client needs to decode: scales and row sums of W_q."""
        from safetensors.torch import save

        return Response(save(worker.codec_tensors()), media_type="application/octet-stream")

    @app.post(f"{prefix}/sessions", status_code=201)
    async def create_session(request: Request, scheme: str | None = None, param_set: str | None = None):
        # Without names, the bundle's scheme and set apply; the body is the scheme's session key (RLWE: empty).
        try:
            chosen = manifest.crypto.resolve_session(scheme, param_set)
        except ConfigError as err:
            return error(422, f"{err.message}; {err.hint}")
        scheme = chosen.scheme
        refusal = manifest.session_refusal(chosen)
        if refusal:
            return error(422, refusal)
        if chosen.session_key_bytes and isinstance(sessions, SignedSessions):  # a token cannot carry a key
            return error(422, f"scheme {scheme} needs per-session keys; use rlwe with --ray")
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
        refusal = admission and admission.opened(sid, request.state.owner)
        if refusal:
            sessions.close(sid)
            return refusal
        log.info("session %s created (%s/%s)", sid[:8], scheme, chosen.name)
        return {"session_id": sid, "token": token, "ttl_s": cfg.session_ttl_s, "scheme": scheme, "param_set": chosen.name,
                "outsourced_sha256": manifest.model.outsourced_sha256}  # the weights this session computes with

    @app.delete(f"{prefix}/sessions/{{sid}}", status_code=204)
    def close_session(sid: str, request: Request):
        got = session_or_error(sessions, sid, request)
        if isinstance(got, JSONResponse):
            return got
        sessions.close(sid)
        return Response(status_code=204)

    @app.post(f"{prefix}/sessions/{{sid}}/ops/{{op}}/{{direction}}")
    async def run_op(sid: str, op: str, direction: str, request: Request, rows: int = 0, cols: int = 0):
        from starlette.concurrency import run_in_threadpool

        got = await run_in_threadpool(session_or_error, sessions, sid, request)  # signed sessions ask the revocation list
        if isinstance(got, JSONResponse):
            return got
        if op not in worker.ops:
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
        tls = (cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        super().__init__(create_app(bundle, cfg), "worker", "hetune-worker", start_timeout_s, tls)


def serve(bundle: Bundle, cfg: ServeConfig = ServeConfig()) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(bundle, cfg)
    log.info("worker on %s; %s", cfg.url, app.state.admission.describe() if app.state.admission else OPEN_ADMISSION)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning",
                ssl_certfile=str(cfg.tls_cert) if cfg.tls_cert else None, ssl_keyfile=str(cfg.tls_key) if cfg.tls_key else None)
