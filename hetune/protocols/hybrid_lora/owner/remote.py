"""HTTP transport for the ``remote`` backend: one or more workers serving the same bundle.

Ops are spread over the workers by decoder layer. A lost connection or a 5xx is
retried with exponential backoff, a 429 with ``Retry-After`` after the time the worker
names, an expired session is re-opened once, and a worker that stays away raises
:class:`WorkerError` naming it. Workers are reached over https verified against the
system's trust store or ``--ca-cert``; plain http only on loopback or with ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch

from hetune.compile.manifest import Manifest
from hetune.errors import ConfigError, WorkerError
from hetune.protocols.hybrid_lora import wire
from hetune.protocols.hybrid_lora.owner.connection import connection_error
from hetune.quant.integer import OpCodec


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # after the first try; waits backoff_s * 2^attempt between tries (31.5 s in all: a worker restart)
    backoff_s: float = 0.5
    timeout_s: float = 600.0  # one request; a big encrypted product takes minutes on CPU


DEFAULT_RETRY = RetryPolicy()
CONNECT_TIMEOUT_S = 5.0  # a worker that does not accept a connection within this is down or firewalled
API_KEY_ENV = "HETUNE_API_KEY"
_API_KEY_HINT = f"set {API_KEY_ENV} or pass --api-key-file with the key the worker's operator made with `hetune keys new`"


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WorkerAccess:
    """How the data owner reaches its workers: whom to trust over https, and its admission key."""

    ca_cert: Path | None = None  # trust only this CA (PEM) for https; None: the system's trust store
    insecure: bool = False  # allow plain http:// to a host other than loopback
    api_key: str | None = field(default=None, repr=False)  # sent only to open a session

    @classmethod
    def load(cls, ca_cert: Path | None = None, insecure: bool = False, api_key_file: Path | None = None) -> "WorkerAccess":
        """The API key comes from ``api_key_file``, else from $HETUNE_API_KEY: never from the command line, where `ps` shows it."""
        if api_key_file is not None:
            try:
                key = Path(api_key_file).read_text().strip()
            except OSError as err:
                raise ConfigError(f"cannot read --api-key-file {api_key_file}: {err.strerror or err}", _API_KEY_HINT) from err
        else:
            key = os.environ.get(API_KEY_ENV, "").strip()
        return cls(ca_cert, insecure, key or None)

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"worker URL {url!r} is not an http(s) address", "pass --worker https://HOST:PORT")
        if parts.scheme == "http" and not self.insecure and not _is_loopback(parts.hostname):
            raise ConfigError(
                f"worker URL {url} is plain http to a host other than loopback: its session token, API key and "
                "timing would cross the network unauthenticated and in the clear",
                "serve the worker with --tls-cert/--tls-key and pass --worker https://..., or pass --insecure to accept this",
            )

    def ssl_context(self) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=str(self.ca_cert) if self.ca_cert else None)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"cannot use --ca-cert {self.ca_cert}: {err}", "pass the PEM certificate of the CA that signed the worker's") from err


def _certificate_failure(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, ssl.SSLCertVerificationError):
            return True
        err = err.__cause__ or err.__context__
    return False


class WorkerClient:
    def __init__(self, url: str, retry: RetryPolicy | None = None, access: WorkerAccess | None = None):
        import httpx

        self.url = url.rstrip("/")
        self.retry = retry or DEFAULT_RETRY
        self._access = access or WorkerAccess()
        self._access.check_url(self.url)
        self.http = httpx.Client(base_url=f"{self.url}/{wire.API_VERSION}", verify=self._access.ssl_context(),
                                 timeout=httpx.Timeout(self.retry.timeout_s, connect=CONNECT_TIMEOUT_S))
        self._reached = False  # until the worker first answers, a failure is a set-up mistake: reported, not retried
        self.session_id: str | None = None
        self._token: str | None = None
        self._key: bytes | None = None
        self._params = None  # the session's hetune.crypto.scheme.ParamSet
        self.fingerprint: str | None = None  # outsourced_sha256 the data owner verified; each session must report it

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        for attempt in range(self.retry.retries + 1):
            wait = self.retry.backoff_s * 2**attempt
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if not self._reached or _certificate_failure(err):  # retrying cannot help; the worker may be an impostor
                    raise connection_error(self.url, self._access.ca_cert, err) from err
                problem = f"cannot reach worker {self.url}: {err}"
            else:
                self._reached = True
                retry_after = response.headers.get("retry-after", "")
                if response.status_code < 500 and not (response.status_code == 429 and retry_after.isdigit()
                                                       and attempt < self.retry.retries):
                    return response
                problem = f"worker {self.url} answered {response.status_code}"
                wait = float(retry_after) if retry_after.isdigit() else wait  # a 429 says when to come back
            if attempt < self.retry.retries:
                time.sleep(wait)
        raise WorkerError(problem, "check that `hetune serve` is still running there")

    def _checked(self, response, what: str, hint: str | None = None):
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise WorkerError(f"worker {self.url} refused {what}: {response.status_code} {detail}", hint)
        return response

    def info(self) -> dict:
        return self._checked(self._request("GET", "/info"), "info").json()

    def codec_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self._checked(self._request("GET", "/codec"), "codec").content)

    def open(self, params, session_key: bytes) -> None:
        """A new session for the keys' scheme and parameter set; ``session_key`` is b"" for batched RLWE."""
        self._key, self._params = session_key, params
        query = {"scheme": params.scheme, "param_set": params.name}
        admission = {"authorization": f"Bearer {self._access.api_key}"} if self._access.api_key else {}
        response = self._request("POST", "/sessions", content=session_key, params=query, headers=admission)
        data = self._checked(response, "a new session", _API_KEY_HINT if response.status_code == 401 else None).json()
        served = data.get("outsourced_sha256")
        if self.fingerprint is not None and served != self.fingerprint:  # e.g. restarted on another bundle since /info
            self.close_session(data["session_id"], data["token"])
            raise WorkerError(f"worker {self.url} opened a session on other weights (outsourced weights sha256 "
                              f"{str(served)[:12]}) than the bundle checked against the local model ({self.fingerprint[:12]})",
                              "serve the bundle compiled from your model on that worker, then rerun (with --resume if a run had started)")
        self.session_id, self._token = data["session_id"], data["token"]

    def run(self, op: str, direction: str, payload: bytes, rows: int, cols: int) -> tuple[bytes, float]:
        """The result body and the worker's seconds (its ``x-worker-seconds`` header)."""
        path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
        for reopened in (False, True):
            response = self._request(
                "POST", path, content=payload, params={"rows": rows, "cols": cols},
                headers={"authorization": f"Bearer {self._token}", "content-type": "application/octet-stream"},
            )
            if response.status_code == 404 and "session" in response.text and not reopened:
                self.open(self._params, self._key)  # the worker restarted or the session expired
                path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
                continue
            response = self._checked(response, f"{op} {direction}")
            return response.content, float(response.headers.get("x-worker-seconds", 0.0))
        raise AssertionError("unreachable")

    def close_session(self, session_id: str, token: str) -> None:
        try:
            self.http.delete(f"/sessions/{session_id}", headers={"authorization": f"Bearer {token}"})
        except Exception:  # closing is best effort: the session expires anyway
            pass

    def close(self) -> None:
        if self.session_id:
            self.close_session(self.session_id, self._token)
        self.session_id = self._token = self._key = self._params = None
        self.http.close()


class HttpTransport:
    name = "remote"

    def __init__(self, urls: tuple[str, ...] | list[str], access: WorkerAccess | None = None):
        self.clients = [WorkerClient(u, access=access) for u in urls]
        infos = [c.info() for c in self.clients]
        self.manifest = Manifest.from_dict(infos[0]["manifest"])
        for client, info in zip(self.clients[1:], infos[1:]):
            if info["manifest"]["model"]["weights_sha256"] != self.manifest.model.weights_sha256:
                raise WorkerError(f"worker {client.url} serves a different bundle than {self.clients[0].url}")
        self._by_op = {op.name: self.clients[max(op.layer, 0) % len(self.clients)] for op in self.manifest.ops}

    def codecs(self) -> dict[str, OpCodec]:
        tensors = self.clients[0].codec_tensors()
        return {op.name: op.codec(tensors, self.manifest.quant) for op in self.manifest.ops}

    def verified(self, fingerprint: str) -> None:
        """The data owner checked the manifest's weights against its model: every session must serve these."""
        for client in self.clients:
            client.fingerprint = fingerprint

    def in_features(self, op: str) -> int:
        return self.manifest.op(op).in_features

    def resolve_session(self, scheme: str | None, param_set: str | None):
        return self.manifest.crypto.resolve_session(scheme, param_set)

    def open(self, params, session_key: bytes) -> None:
        for client in self.clients:
            client.open(params, session_key)

    def run(self, op: str, direction: str, payload: bytes, rows: int, cols: int) -> tuple[bytes, float]:
        return self._by_op[op].run(op, direction, payload, rows, cols)

    def close(self) -> None:
        for client in self.clients:
            client.close()
