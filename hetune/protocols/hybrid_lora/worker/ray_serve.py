"""``hetune serve --ray``: the worker app on Ray Serve, stateless replicas behind one HTTP endpoint.

Why replicas can be stateless: with batched RLWE a session holds no key, so it lives in a
signed token (:mod:`hetune.serving.signed_sessions`) that any replica checks, and closed
sessions sit in one small revocation-list actor. Every replica runs the same FastAPI app
(:func:`~hetune.protocols.hybrid_lora.worker.server.create_app`) behind Serve's HTTP proxy; Serve
restarts a replica that dies and the client's retries carry the step through. A model too
large for one replica is split by layer range: each :class:`OpSlice` deployment loads only
its blocks' ops, and the ingress replicas route each op to the slice that holds it.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from hetune.compile.bundle import Bundle, load_bundle, read_manifest
from hetune.compile.manifest import Manifest
from hetune.crypto.scheme import ParamSet
from hetune.crypto.registry import resolve_params
from hetune.errors import ConfigError
from hetune.protocols.hybrid_lora.worker.server import ServeConfig, Session, create_app
from hetune.protocols.hybrid_lora.worker.runner import OpShape, Worker
from hetune.serving.signed_sessions import KEY_ENV, KEY_HINT, Claims, SessionTokens, SignedSessions, load_session_key

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


@ray.remote(num_cpus=0, max_restarts=-1)
class RevocationList:
    """Closed session ids until their tokens expire: one per app, shared by its replicas (a restart forgets them)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def revoke(self, session_id: str, until: float) -> None:
        now = time.time()
        self._until = {sid: t for sid, t in self._until.items() if t > now}
        self._until[session_id] = until

    def is_revoked(self, session_id: str) -> bool:
        return session_id in self._until


class ActorRevocations:
    """:class:`~hetune.serving.signed_sessions.Revocations` over the app's RevocationList actor."""

    def __init__(self, app_name: str):
        self._actor = RevocationList.options(name=f"{app_name}-revocations", namespace="hetune", get_if_exists=True,
                                             lifetime="detached").remote()

    def revoke(self, session_id: str, until: float) -> None:
        ray.get(self._actor.revoke.remote(session_id, until))

    def is_revoked(self, session_id: str) -> bool:
        return ray.get(self._actor.is_revoked.remote(session_id))


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


def _record(claims: Claims, token: str) -> Session:
    return Session(token, resolve_params(claims.scheme, claims.param_set), None, claims.owner)


@serve.deployment
@serve.ingress()
class WorkerIngress:
    """The worker's FastAPI app on a Serve replica, sessions in signed tokens; with slices, a router to them."""

    def __init__(self, bundle: str, cfg: ServeConfig, session_key_file: str | None, threads: int, *slices: DeploymentHandle):
        torch.set_num_threads(threads)
        key = load_session_key(Path(session_key_file) if session_key_file else None)
        if key is None:
            raise ConfigError("the replicas have no session key to sign and check tokens with", KEY_HINT)
        app_name = serve.get_replica_context().app_name
        self.sessions = SignedSessions(SessionTokens(key), cfg.session_ttl_s, ActorRevocations(app_name), _record)
        self.path, self.cfg, self.slices = Path(bundle), cfg, slices

    async def __serve_build_asgi_app__(self) -> FastAPI:
        if self.slices:
            described = [(handle, await handle.describe.remote()) for handle in self.slices]
            manifest = read_manifest(self.path)
            app = create_app(Bundle(self.path, manifest, {}), self.cfg, SliceRouter(manifest, described), self.sessions)
        else:
            app = create_app(load_bundle(self.path), self.cfg, sessions=self.sessions)
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
    return WorkerIngress.options(**(router if slices else compute)).bind(str(bundle), cfg, key_file, rc.threads, *slices)


_BUILDER_ARGS = {
    "session_ttl": ("session_ttl_s", float), "max_rows": ("max_rows", int), "replicas": ("replicas", int),
    "min_replicas": ("min_replicas", int), "max_replicas": ("max_replicas", int), "num_cpus": ("num_cpus", float),
    "num_gpus": ("num_gpus", float), "layer_ranges": ("layer_ranges", parse_layer_ranges),
    "session_key_file": ("session_key_file", Path),
}


def app_builder(args: dict[str, str | int | float]) -> Application:
    """For Ray's own ``serve run`` / ``serve deploy`` (deploy/ray-serve/): ``bundle`` and the CLI's options by name."""
    unknown = set(args) - set(_BUILDER_ARGS) - {"bundle"}
    if "bundle" not in args or unknown:
        raise ConfigError(f"app args need 'bundle' and take {', '.join(sorted(_BUILDER_ARGS))}; got {sorted(args)}",
                          "see deploy/ray-serve/serve_config.yaml")
    parsed = {field: convert(args[name]) for name, (field, convert) in _BUILDER_ARGS.items() if name in args}
    serve_fields = {k: v for k, v in parsed.items() if k in ("session_ttl_s", "max_rows")}
    rc = RayServeConfig(**{k: v for k, v in parsed.items() if k not in serve_fields})
    return build_app(Path(args["bundle"]), ServeConfig(**serve_fields), rc)


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
    serve.start(http_options=http)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=address is None)
    except KeyboardInterrupt:
        serve.shutdown()
