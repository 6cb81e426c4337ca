"""``hetune serve``: the remote worker, a FastAPI app over one bundle.

It loads only the bundle (integer weights; no float model, no transformers or peft),
keeps one session per data owner (its scheme and parameter set, a bearer token, an
idle TTL, and whatever key the scheme needs: none for batched RLWE, a compression key
for GLWE), checks op, direction, shape, header and body size before any heavy work,
and answers every bad request with a 4xx JSON error. Logs carry method, path, status
and timing: never a key, a token or a payload. On a network it serves https
(``tls_cert``/``tls_key``) and admits data owners by API key with per-owner limits
(``api_keys``, :mod:`hetune.serving.admission`); without keys it is open, and says so,
and it refuses to listen beyond loopback without both unless told ``insecure``.

Admission and session checks are route dependencies: they run on the routed request
before its handler, so no handler runs, no session is created and no body is read for
a request that fails them. Bodies in flight share a memory budget (:class:`BodyBudget`). A batched-RLWE
product starts as its body arrives: its header is checked, then each piece of whole features is
multiplied in and summed while the next is read (the owner's encryption and the upload hide behind the
GEMMs); a body that ends short or breaks off leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from hetune.compile.bundle import Bundle
from hetune.compile.manifest import Manifest
from hetune.crypto.scheme import ParamSet, PayloadError
from hetune.crypto.registry import get_scheme, scheme_names
from hetune.errors import ConfigError
from hetune.net import is_loopback
from hetune.protocols.hybrid_lora import wire
from hetune.serving.admission import OPEN_ADMISSION, Admission, OwnerLimits, read_keys_file
from hetune.protocols.hybrid_lora.worker.runner import OpRunner, Worker
from hetune.serving.http_api import (BodyBudget, LoopbackServer, add_access_log, add_refusals, bearer, error,
                                     read_body, require_session)
from hetune.serving.sessions import SessionLimitError, SessionStore
from hetune.serving.signed_sessions import SignedSessions

log = logging.getLogger("hetune.worker")
MIB = 2**20

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
    # Request bodies in flight (bytes held from before a body is read until its answer is ready):
    body_budget_mib: int = 1024  # in all; with the products' working sets this bounds the worker's memory
    owner_body_budget_mib: int = 512  # per owner (per session without api_keys); one 16,384-wide 4096-row RLWE body is 385 MiB
    body_timeout_s: float = 120.0  # to receive one body; a held upload is cut off (408) and gives its budget back
    insecure: bool = False  # allow listening beyond loopback without TLS and API keys

    def __post_init__(self) -> None:
        if self.owner_body_budget_mib < 1 or self.body_budget_mib < self.owner_body_budget_mib or self.body_timeout_s <= 0:
            raise ConfigError(f"body budgets {self.body_budget_mib} MiB in all / {self.owner_body_budget_mib} MiB per owner "
                              f"and --body-timeout {self.body_timeout_s} s are out of range",
                              "pass 1 <= --owner-body-budget-mib <= --body-budget-mib and a positive --body-timeout")
        missing = [what for what, given in (("TLS (--tls-cert/--tls-key)", self.tls_cert), ("--api-keys", self.api_keys)) if not given]
        if not is_loopback(self.host) and missing and not self.insecure:
            raise ConfigError(
                f"refusing to listen on {self.host} without {' and '.join(missing)}: anyone who reaches it could open "
                "sessions, and tokens and ciphertexts would cross the network in the clear",
                "pass --tls-cert/--tls-key and --api-keys, listen on 127.0.0.1 behind a TLS proxy, or pass --insecure to accept this")
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
    owner: str | None = None  # the API-key owner who opened it (None: admission open)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Parts:
    """What the routes share: the bundle's manifest, the settings, and the worker's state."""

    manifest: Manifest
    cfg: ServeConfig
    worker: OpRunner
    sessions: SessionStore[Session] | SignedSessions[Session]
    admission: Admission | None
    budget: BodyBudget

    def key_owner(self, request: Request) -> str | None:
        """Routes without a session: with api_keys, the key's owner (401 otherwise), charged one request."""
        if self.admission is None:
            return None
        owner = self.admission.authenticate(bearer(request))
        self.admission.charge(owner)
        return owner

    def session_of(self, sid: str, request: Request) -> Session:
        """Routes of a session: the session whose token this is (404 / 401 otherwise), then its owner charged one request.
        Sync, so FastAPI runs it in its thread pool: on Ray both steps may ask the shared ledger."""
        got = require_session(self.sessions, sid, request)
        if self.admission is not None and got.owner is not None:
            self.admission.charge(got.owner)
        return got


def create_app(bundle: Bundle, cfg: ServeConfig = ServeConfig(), worker: OpRunner | None = None,
               sessions: SignedSessions[Session] | None = None, admission: Admission | None = None,
               budget: BodyBudget | None = None) -> FastAPI:
    """``worker`` computes the products (default: this process, on ``bundle``'s weights); ``sessions``
    in signed tokens let replicas share them (``hetune serve --ray``), else they live in this process;
    ``admission`` and ``budget`` with state shared by replicas, else ones from ``cfg`` in this process."""
    worker = worker or Worker(bundle)
    if sessions is None:  # not `or`: an empty store is falsy
        sessions = SessionStore(cfg.max_sessions, cfg.session_ttl_s, log)
    if admission is None and cfg.api_keys is not None:
        admission = Admission(read_keys_file(cfg.api_keys), cfg.owner_limits, sessions.owned_by)
    parts = _Parts(bundle.manifest, cfg, worker, sessions, admission,
                   budget or BodyBudget(cfg.body_budget_mib * MIB, cfg.owner_body_budget_mib * MIB))
    app = FastAPI(title="hetune worker", version=parts.manifest.hetune_version, redirect_slashes=False)  # no Location from a Host header
    app.state.admission, app.state.budget = admission, parts.budget
    add_refusals(app)
    add_access_log(app, log)
    prefix = f"/{wire.API_VERSION}"
    _add_status_routes(app, prefix, parts)
    _add_session_routes(app, prefix, parts)
    _add_op_route(app, prefix, parts)
    return app


def _add_status_routes(app: FastAPI, prefix: str, parts: _Parts) -> None:
    """/live (open, says nothing), and /health, /info, /codec (behind the key when keys are on)."""
    manifest, cfg, worker, keyed = parts.manifest, parts.cfg, parts.worker, [Depends(parts.key_owner)]

    @app.get(f"{prefix}/live")
    def live():
        """Liveness for probes and load balancers: open, and says nothing else."""
        return {"status": "ok"}

    @app.get(f"{prefix}/health", dependencies=keyed)
    def health():
        return {"status": "ok", "sessions": len(parts.sessions)}

    @app.get(f"{prefix}/info", dependencies=keyed)
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

    @app.get(f"{prefix}/codec", dependencies=keyed)
    def codec():
        """Per-channel data the client needs to decode: scales and row sums of W_q."""
        from safetensors.torch import save

        return Response(save(worker.codec_tensors()), media_type="application/octet-stream")


def _add_session_routes(app: FastAPI, prefix: str, parts: _Parts) -> None:
    """Opening a session (every cap checked, and a place held, before its key is read) and closing one."""
    manifest, cfg, sessions, admission, budget = parts.manifest, parts.cfg, parts.sessions, parts.admission, parts.budget

    @app.post(f"{prefix}/sessions", status_code=201)
    async def create_session(request: Request, scheme: str | None = None, param_set: str | None = None,
                             owner: str | None = Depends(parts.key_owner)):
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
        try:  # every cap is checked, and a place held, before the key (GLWE: 128 MiB) is read
            with ExitStack() as held:
                held.enter_context(sessions.reserve())
                if admission is not None:  # in the thread pool: on Ray it counts in the shared ledger
                    await run_in_threadpool(held.enter_context, admission.opening(owner))
                held.enter_context(budget.hold(owner or "open", chosen.session_key_bytes))  # 0 bytes on Ray: no ledger call
                body = await read_body(request, chosen.session_key_bytes, cfg.body_timeout_s)
                if isinstance(body, JSONResponse):
                    return body
                try:
                    state = await run_in_threadpool(get_scheme(scheme).open_session, chosen, body)
                except PayloadError as err:
                    return error(err.status, err.message)
                sid, token = await run_in_threadpool(
                    sessions.create, lambda token: Session(token, chosen, state, owner), True)
        except SessionLimitError as err:
            if err.owner is not None and admission is not None:  # the shared ledger found the owner's cap full
                raise admission.full(err.owner) from None
            return error(429, f"worker is at its limit of {cfg.max_sessions} sessions; close one or retry later",
                         Admission.SESSION_FULL_RETRY_S)
        log.info("session %s created (%s/%s)", sid[:8], scheme, chosen.name)
        return {"session_id": sid, "token": token, "ttl_s": cfg.session_ttl_s, "scheme": scheme, "param_set": chosen.name,
                "outsourced_sha256": manifest.model.outsourced_sha256}  # the weights this session computes with

    @app.delete(f"{prefix}/sessions/{{sid}}", status_code=204)
    def close_session(sid: str, got: Session = Depends(parts.session_of)):
        sessions.close(sid)
        return Response(status_code=204)


def _add_op_route(app: FastAPI, prefix: str, parts: _Parts) -> None:
    """One product: op, direction and shape checked, the body held in the budget while it is read and computed."""
    cfg, worker, budget = parts.cfg, parts.worker, parts.budget

    @app.post(f"{prefix}/sessions/{{sid}}/ops/{{op}}/{{direction}}")
    async def run_op(sid: str, op: str, direction: str, request: Request, rows: int = 0, cols: int = 0, stream: bool = False,
                     got: Session = Depends(parts.session_of)):
        """``stream``: answer in chunks as they are computed (a hint; a product the owner decrypts as it arrives),
        the worker's seconds in the result's trailer; else whole, with them in an x-worker-seconds header too.
        A product (batched RLWE) is computed as its body arrives: whole features at a time, summed."""
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
        size = scheme.request_bytes(params, rows, cols)
        with ExitStack() as held:  # the budget is held until the answer is ready (or streamed): the body or the sums live that long
            # Multiplied as it arrives where the worker can (a router over replicas, ray_serve, cannot) and the sums fit
            # the budget; else read whole and multiplied after, as a hint query always is.
            accumulate, sums = getattr(worker, "accumulator", None), scheme.product_bytes(params, rows, shape.out_cols, cols)
            if sums > min(budget.total, budget.per_holder):
                accumulate = None
            held_size = max(size, sums) if accumulate else size
            await run_in_threadpool(held.enter_context, budget.hold(got.owner or sid, held_size))  # on Ray: the shared ledger
            arriving = _Arriving(accumulate and (lambda header: accumulate(op, direction, params, got.state, header, rows, cols)),
                                 scheme.header_bytes, got.lock)
            try:
                body = await read_body(request, size, cfg.body_timeout_s, arriving)
                if isinstance(body, JSONResponse):
                    return body
                if arriving.acc is not None:
                    if arriving.total != size:
                        return error(422, f"a {rows}x{cols} request is {size} bytes, got {arriving.total} (truncated?)")
                    await arriving.finish()
            except PayloadError as err:  # a bad header or piece: nothing of the product is kept
                return error(err.status, err.message)
            finally:
                await arriving.settle()
            if arriving.acc is not None:  # multiplied as it arrived: only the answer is left
                chunks = arriving.acc.results()
            else:
                body = arriving.body()
                try:
                    scheme.check_request(params, body, rows, cols)  # header and exact size, before any heavy work
                except PayloadError as err:
                    return error(err.status, err.message)
                chunks = worker.run_stream(op, direction, params, got.state, body)
            if stream:
                return StreamingResponse(_one_at_a_time(chunks, got.lock, held.pop_all()), media_type="application/octet-stream")

            def compute() -> tuple[bytes, float]:
                with got.lock:  # one product at a time per session
                    t0 = time.perf_counter()
                    result = b"".join(chunks)
                    return result, arriving.acc.seconds if arriving.acc is not None else time.perf_counter() - t0

            try:
                result, seconds = await run_in_threadpool(compute)
            except PayloadError as err:  # e.g. a GLWE ciphertext the extension cannot read
                return error(err.status, err.message)
        return Response(result, media_type="application/octet-stream", headers={"x-worker-seconds": f"{seconds:.6f}"})


class _Arriving:
    """A request body as it arrives: with an accumulator (the scheme's, made from the header), whole features are
    multiplied a piece at a time in the thread pool while the next piece is read; without one, kept whole.
    Holds at most a piece being multiplied and a piece arriving, besides the accumulator's sums."""

    def __init__(self, make, header_bytes: int, lock: threading.Lock):
        """``make``: the header's bytes -> an accumulator, or None (or ``make`` None, or no header): kept whole."""
        self.make, self.header_bytes, self.lock = make, header_bytes, lock
        self.acc, self.whole = None, make is None or header_bytes == 0
        self.buf, self.parts, self.total = bytearray(), [], 0
        self.pending: asyncio.Future | None = None

    async def __call__(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.whole:
            self.parts.append(chunk)
            return
        self.buf += chunk
        if self.acc is None:
            if len(self.buf) < self.header_bytes:
                return
            self.acc = await run_in_threadpool(self.make, bytes(self.buf[: self.header_bytes]))
            if self.acc is None:
                self.whole, self.parts, self.buf = True, [bytes(self.buf)], bytearray()
                return
            del self.buf[: self.header_bytes]
        while len(self.buf) >= self.acc.feed_bytes:
            piece = bytes(self.buf[: self.acc.feed_bytes])
            del self.buf[: self.acc.feed_bytes]
            await self._feed(piece)

    async def _feed(self, piece: bytes) -> None:
        await self.settle(quiet=False)  # one piece in the thread pool at a time, in order; its error comes out here
        self.pending = asyncio.ensure_future(run_in_threadpool(self._locked_feed, piece))

    def _locked_feed(self, piece: bytes) -> None:
        with self.lock:  # one product's work at a time per session
            self.acc.feed(piece)

    async def finish(self) -> None:
        """The body has all come: the rest (whole features, or PayloadError) multiplied too."""
        if self.buf:
            await self._feed(bytes(self.buf))
            self.buf.clear()
        await self.settle(quiet=False)

    async def settle(self, quiet: bool = True) -> None:
        """Wait for the piece in the thread pool (a failed read still waits: no work outlives the budget)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                await pending
            except Exception:
                if not quiet:
                    raise

    def body(self) -> bytes:
        return b"".join(self.parts) + bytes(self.buf)  # buf: a body shorter than a header


def _one_at_a_time(chunks: Iterator[bytes], lock: threading.Lock, held: ExitStack) -> Iterator[bytes]:
    """A streamed answer's chunks, each computed under the session's lock (Starlette pulls them in its thread pool,
    one after the other); ``held`` (the body's budget) is released when the stream ends or is dropped."""
    with held:
        while True:
            with lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk


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
