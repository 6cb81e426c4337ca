"""``hetune serve --ray``: the worker app on Ray Serve, stateless replicas behind one HTTP endpoint.

Why replicas can be stateless: with batched RLWE a session holds no key, so it lives in a
signed token (:mod:`hetune.serving.signed_sessions`) that any replica checks; what replicas
must agree on (live sessions for the caps, closed ones, each owner's request rate, the bytes
of request bodies in flight) sits in one small ledger actor per app, so admission limits and
the body budget hold across replicas. Every replica runs the same FastAPI app
(:func:`~hetune.protocols.hybrid_lora.worker.server.create_app`) behind Serve's HTTP proxy; Serve
restarts a replica that dies and the client's retries carry the step through. A model too
large for one replica is split by layer range: each :class:`OpSlice` deployment loads only
its blocks' ops, and the ingress replicas route each op to the slice that holds it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import torch
from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from hetune.compile.bundle import Bundle, load_bundle, read_manifest
from hetune.compile.manifest import Manifest
from hetune.crypto.scheme import ParamSet
from hetune.crypto.registry import resolve_params
from hetune.errors import ConfigError
from hetune.net import is_loopback
from hetune.protocols.hybrid_lora.worker.server import MIB, ServeConfig, Session, create_app
from hetune.protocols.hybrid_lora.worker.runner import OpShape, Worker
from hetune.serving.admission import Admission, OwnerLimits, read_keys_file
from hetune.serving.http_api import BodyBudget
from hetune.serving.signed_sessions import (HEARTBEAT_S, KEY_ENV, KEY_HINT, Claims, LedgerBodies, LocalLedger, SessionTokens,
                                            SignedSessions, load_session_key)

APP_NAME = "hetune-worker"
REPLICA_HEADER = "x-worker-replica"  # which replica answered: for tests and load-balancing checks


def parse_layer_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``"0:8,8:16"`` -> ((0, 8), (8, 16)): half-open ranges of decoder blocks, one deployment each."""
    try:
        return tuple((int(lo), int(hi)) for lo, hi in (part.split(":") for part in text.split(",") if part.strip()))
    except ValueError as err:
        raise ConfigError(f"--layer-ranges {text!r} is not a list of START:STOP block ranges", "write e.g. 0:8,8:16") from err


@dataclass(frozen=True)
class RayServeConfig:
    replicas: int = 1  # of the ingress deployment, and of each slice
    min_replicas: int | None = None  # with max_replicas: Serve autoscales between them instead
    max_replicas: int | None = None
    num_cpus: float = 1.0  # per replica; also its torch threads (at least 1)
    num_gpus: float = 0.0
    layer_ranges: tuple[tuple[int, int], ...] = ()  # () keeps every op in the ingress replicas
    session_key_file: Path | None = None  # None: $HETUNE_SESSION_KEY in the replicas' environment
    require_tls: bool = False  # refuse to serve unless Serve's proxies speak https (set by --tls-cert, or serve_config.yaml)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas {self.replicas} must be at least 1", "pass --replicas 1 or more")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("--min-replicas and --max-replicas go together", "pass both to autoscale, or neither")
        if self.min_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"autoscaling bounds {self.min_replicas}..{self.max_replicas} are not 1 <= min <= max",
                              "pass e.g. --min-replicas 1 --max-replicas 4")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError(f"--num-cpus {self.num_cpus} / --num-gpus {self.num_gpus} out of range", "CPUs > 0, GPUs >= 0")
        stops = [0] + [hi for _, hi in self.layer_ranges]
        if any(lo != stop or hi <= lo for (lo, hi), stop in zip(self.layer_ranges, stops)):
            raise ConfigError(f"--layer-ranges {self.layer_ranges} must be consecutive non-empty ranges from block 0",
                              "write e.g. 0:8,8:16 for 16 blocks")

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))

    def scaling(self) -> dict:
        if self.min_replicas is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                       "target_ongoing_requests": self.threads}}  # scale up once requests queue

    def check_covers(self, manifest: Manifest) -> None:
        blocks = max(op.layer for op in manifest.ops) + 1
        if self.layer_ranges and self.layer_ranges[-1][1] != blocks:
            raise ConfigError(f"--layer-ranges end at block {self.layer_ranges[-1][1]}, the bundle has {blocks} blocks",
                              f"make the last range end at {blocks}")


class _ActorLedger(LocalLedger):
    """The ledger as Ray (re)starts it: after a restart it knows it replaces a lost one."""

    def __init__(self) -> None:
        super().__init__(restarted=ray.get_runtime_context().was_current_actor_reconstructed)


# One per app. Ray restarts it if it dies; what the restart forgets is made harmless (signed_sessions), and a call
# caught by the restart is retried on the new one (at worst charging a request or holding bytes twice: stricter).
LedgerActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_ActorLedger)
LEDGER_TIMEOUT_S = 30.0  # a body reservation waits this long for a restarting ledger, then gets a 503


class ActorLedger:
    """:class:`~hetune.serving.signed_sessions.SessionLedger` over the app's ledger actor, shared by its replicas.
    Releases and reports are sent without waiting: the actor runs one caller's calls in the order they were sent."""

    def __init__(self, app_name: str):
        self._actor = LedgerActor.options(name=f"{app_name}-ledger", namespace="hetune", get_if_exists=True,
                                          lifetime="detached").remote()

    def open(self, session_id: str, owner: str | None, until: float, max_sessions: int,
             owner_sessions: int | None) -> tuple[str | None, str]:
        return ray.get(self._actor.open.remote(session_id, owner, until, max_sessions, owner_sessions))

    def revoke(self, session_id: str, until: float) -> None:
        ray.get(self._actor.revoke.remote(session_id, until))

    def check(self, session_id: str, epoch: str | None) -> str | None:
        return ray.get(self._actor.check.remote(session_id, epoch))

    def live(self, owner: str | None = None) -> int:
        return ray.get(self._actor.live.remote(owner))

    def take(self, owner: str, per_minute: int) -> float:
        return ray.get(self._actor.take.remote(owner, per_minute))

    def reserve(self, replica: str, holder: str, size: int, total: int, per_holder: int, lease_s: float) -> str | None:
        try:
            return ray.get(self._actor.reserve.remote(replica, holder, size, total, per_holder, lease_s),
                           timeout=LEDGER_TIMEOUT_S)
        except RayError:  # the ledger is down or restarting: no reservation, so no body (a 503)
            return "restarting"

    def release(self, replica: str, holder: str, size: int) -> None:
        self._actor.release.remote(replica, holder, size)

    def renew(self, replica: str, held: Mapping[str, int], lease_s: float) -> None:
        self._actor.renew.remote(replica, held, lease_s)


def _renew_forever(budget: BodyBudget) -> None:
    """A replica's heartbeat: its body holds re-reported every HEARTBEAT_S (the ledger drops a replica that stops)."""
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            budget.renew()
        except RayError:  # the ledger is restarting: the next report reaches the new one
            pass


_TLS_HINT = ("start Serve with the certificate (`serve shutdown`, then deploy again; or http_options.ssl_certfile and "
             "ssl_keyfile in serve_config.yaml), or terminate TLS in a proxy in front and drop --tls-cert / require_tls")


def check_endpoint(http, cfg: ServeConfig, require_tls: bool) -> None:
    """Serve's proxies (``http``: their HTTPOptions) must serve what was asked: https when TLS was asked for,
    and beyond loopback TLS and API keys unless ``cfg.insecure``. Serve itself only warns and keeps its old options."""
    tls = bool(getattr(http, "ssl_certfile", None))
    if (require_tls or cfg.tls_cert) and not tls:
        raise ConfigError(f"TLS was asked for, but Serve's proxies on this cluster serve plain http on {http.host}:{http.port} "
                          "(Serve was started before, without a certificate): it cannot be applied", _TLS_HINT)
    if cfg.tls_cert and (http.ssl_certfile, http.ssl_keyfile) != (str(cfg.tls_cert), str(cfg.tls_key)):
        raise ConfigError(f"Serve's proxies already serve https with {http.ssl_certfile}, not --tls-cert {cfg.tls_cert}",
                          _TLS_HINT)
    missing = [what for what, given in (("TLS", tls), ("API keys", cfg.api_keys)) if not given]
    if not is_loopback(http.host) and missing and not cfg.insecure:
        raise ConfigError(f"Serve's proxies listen on {http.host} and this app has no {' and no '.join(missing)}",
                          "pass --tls-cert/--tls-key and --api-keys (or their serve_config.yaml options), or --insecure")


def _running_http_options():
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config


@serve.deployment
class OpSlice:
    """The ops of one range of decoder blocks; loads only their weights. Reached only through the
    ingress replicas' handles (which check sessions), never over HTTP."""

    def __init__(self, bundle: str, layers: tuple[int, int], threads: int):
        torch.set_num_threads(threads)
        self.worker = Worker(load_bundle(Path(bundle), layers=range(*layers)))

    def describe(self) -> tuple[list[str], dict[str, torch.Tensor], str]:
        return list(self.worker.ops), self.worker.codec_tensors(), self.worker.device

    def run(self, op: str, direction: str, params: ParamSet, body: bytes) -> bytes:
        return self.worker.run(op, direction, params, None, body)


class SliceRouter:
    """The ingress replicas' :class:`~hetune.protocols.hybrid_lora.worker.runner.OpRunner` when ops live on slices."""

    def __init__(self, manifest: Manifest, slices: list[tuple[DeploymentHandle, tuple[list[str], dict, str]]]):
        self._manifest = manifest
        self._by_op = {op: handle for handle, (ops, _, _) in slices for op in ops}
        self._codec = {k: v for _, (_, codec, _) in slices for k, v in codec.items()}
        self.device = slices[0][1][2]

    @property
    def ops(self) -> Collection[str]:
        return self._by_op.keys()

    def shape(self, op: str, direction: str) -> OpShape:
        spec = self._manifest.op(op)
        return OpShape(spec.in_features, spec.out_features) if direction == "forward" else OpShape(spec.out_features, spec.in_features)

    def codec_tensors(self) -> dict[str, torch.Tensor]:
        return self._codec

    def run(self, op: str, direction: str, params: ParamSet, session: object, body: bytes) -> bytes:
        return self._by_op[op].run.remote(op, direction, params, body).result()  # called from the server's thread pool

    def run_stream(self, op: str, direction: str, params: ParamSet, session: object, body: bytes) -> Iterator[bytes]:
        """Through a slice the result comes back whole (one Ray call) and is then streamed on."""
        yield self.run(op, direction, params, session, body)


def _record(claims: Claims, token: str) -> Session:
    return Session(token, resolve_params(claims.scheme, claims.param_set), None, claims.owner)


@serve.deployment
@serve.ingress()
class WorkerIngress:
    """The worker's FastAPI app on a Serve replica, sessions in signed tokens; with slices, a router to them."""

    def __init__(self, bundle: str, cfg: ServeConfig, session_key_file: str | None, threads: int, require_tls: bool,
                 *slices: DeploymentHandle):
        torch.set_num_threads(threads)
        check_endpoint(_running_http_options(), cfg, require_tls)  # also for `serve deploy`, which bypasses the CLI
        key = load_session_key(Path(session_key_file) if session_key_file else None)
        if key is None:
            raise ConfigError("the replicas have no session key to sign and check tokens with", KEY_HINT)
        context = serve.get_replica_context()
        ledger = ActorLedger(context.app_name)
        owner_sessions = cfg.owner_limits.sessions if cfg.api_keys else None
        self.sessions = SignedSessions(SessionTokens(key), cfg.session_ttl_s, ledger, _record, cfg.max_sessions, owner_sessions)
        self.admission = None
        if cfg.api_keys is not None:  # counts and rates in the shared ledger, so they hold across replicas
            per_minute = cfg.owner_limits.requests_per_minute
            self.admission = Admission(read_keys_file(cfg.api_keys), cfg.owner_limits, self.sessions.owned_by,
                                       lambda owner: ledger.take(owner, per_minute))
        # Bodies in flight against one budget for all replicas (plus this replica's own, which it never exceeds).
        self.budget = BodyBudget(cfg.body_budget_mib * MIB, cfg.owner_body_budget_mib * MIB,
                                 shared=LedgerBodies(ledger, context.replica_id.unique_id))
        threading.Thread(target=_renew_forever, args=(self.budget,), name="hetune-ledger-heartbeat", daemon=True).start()
        self.path, self.cfg, self.slices = Path(bundle), cfg, slices

    async def __serve_build_asgi_app__(self) -> FastAPI:
        if self.slices:
            described = [(handle, await handle.describe.remote()) for handle in self.slices]
            manifest = read_manifest(self.path)
            app = create_app(Bundle(self.path, manifest, {}), self.cfg, SliceRouter(manifest, described), self.sessions,
                             self.admission, self.budget)
        else:
            app = create_app(load_bundle(self.path), self.cfg, sessions=self.sessions, admission=self.admission,
                             budget=self.budget)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def tag_replica(request: Request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app


def build_app(bundle: Path, cfg: ServeConfig = ServeConfig(), rc: RayServeConfig = RayServeConfig()) -> Application:
    """The Serve application: the ingress deployment, and one deployment per layer range if any."""
    bundle = Path(bundle).resolve()  # replicas start in their own working directories
    rc.check_covers(read_manifest(bundle))
    # A computing replica runs as many products at once as it has threads: more would only contend
    # for its CPUs, so Serve queues the rest and routes them to whichever replica frees up first.
    compute = {"ray_actor_options": {"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus},
               "max_ongoing_requests": rc.threads, **rc.scaling()}
    slices = [OpSlice.options(name=f"OpSlice-{lo}-{hi}", **compute).bind(str(bundle), (lo, hi), rc.threads)
              for lo, hi in rc.layer_ranges]
    router = {"ray_actor_options": {"num_cpus": 0}, **rc.scaling()}  # with slices it only checks and forwards
    key_file = str(Path(rc.session_key_file).resolve()) if rc.session_key_file else None
    if cfg.api_keys is not None:
        read_keys_file(cfg.api_keys)  # a bad file fails here, not in every replica
        cfg = replace(cfg, api_keys=Path(cfg.api_keys).resolve())
    return WorkerIngress.options(**(router if slices else compute)).bind(str(bundle), cfg, key_file, rc.threads,
                                                                         rc.require_tls, *slices)


def _flag(value) -> bool:
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"{value!r} is not true or false", "write true or false")


_SERVE_ARGS = {  # app arg -> (ServeConfig field, converter)
    "session_ttl": ("session_ttl_s", float), "max_rows": ("max_rows", int), "max_sessions": ("max_sessions", int),
    "api_keys": ("api_keys", Path), "body_budget_mib": ("body_budget_mib", int),
    "owner_body_budget_mib": ("owner_body_budget_mib", int), "body_timeout": ("body_timeout_s", float),
    "insecure": ("insecure", _flag),
}
_RAY_ARGS = {  # app arg -> (RayServeConfig field, converter)
    "replicas": ("replicas", int), "min_replicas": ("min_replicas", int), "max_replicas": ("max_replicas", int),
    "num_cpus": ("num_cpus", float), "num_gpus": ("num_gpus", float), "layer_ranges": ("layer_ranges", parse_layer_ranges),
    "session_key_file": ("session_key_file", Path), "require_tls": ("require_tls", _flag),
}
_LIMIT_ARGS = ("owner_sessions", "owner_rpm")


def app_builder(args: dict[str, str | int | float | bool]) -> Application:
    """For Ray's own ``serve run`` / ``serve deploy`` (deploy/ray-serve/): ``bundle`` and the CLI's options by name.
    TLS itself is Serve's (``http_options`` in serve_config.yaml); ``require_tls: true`` makes its absence a hard error."""
    known = {"bundle", *_SERVE_ARGS, *_RAY_ARGS, *_LIMIT_ARGS}
    if "bundle" not in args or set(args) - known:
        raise ConfigError(f"app args need 'bundle' and take {', '.join(sorted(known - {'bundle'}))}; got {sorted(args)}",
                          "see deploy/ray-serve/serve_config.yaml")
    serve_fields = {field: convert(args[name]) for name, (field, convert) in _SERVE_ARGS.items() if name in args}
    ray_fields = {field: convert(args[name]) for name, (field, convert) in _RAY_ARGS.items() if name in args}
    defaults = OwnerLimits()
    limits = OwnerLimits(int(args.get("owner_sessions", defaults.sessions)), int(args.get("owner_rpm", defaults.requests_per_minute)))
    return build_app(Path(args["bundle"]), ServeConfig(**serve_fields, owner_limits=limits), RayServeConfig(**ray_fields))


def serve_on_ray(bundle: Path, cfg: ServeConfig, rc: RayServeConfig, address: str | None = None) -> None:
    """Deploy on the running cluster at ``address`` and return, or start a local cluster and serve until Ctrl-C."""
    app = build_app(bundle, cfg, rc)  # checks the bundle and the ranges before any cluster work
    if load_session_key(rc.session_key_file) is None:
        if address:
            raise ConfigError("--ray on a running cluster needs a session key shared by the replicas", KEY_HINT)
        os.environ[KEY_ENV] = secrets.token_urlsafe(32)  # inherited by the local cluster we start; new on each run
    ray.init(address=address or "local")
    http = {"host": cfg.host, "port": cfg.port}
    if cfg.tls_cert:  # Serve's proxies speak https themselves; the files must exist on every node
        http |= {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)}
    serve.start(http_options=http)  # a Serve already running keeps its options (and only warns): checked next
    check_endpoint(_running_http_options(), cfg, rc.require_tls)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=address is None)
    except KeyboardInterrupt:
        serve.shutdown()
