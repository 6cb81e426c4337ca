"""HTTP transport for the ``remote`` backend: one or more workers serving the same bundle.

Ops are spread over the workers by decoder layer. A lost connection or a 5xx is
retried with exponential backoff, a 429 with ``Retry-After`` after the time the worker
names, an expired session is re-opened once, and a worker that stays away raises
:class:`WorkerError` naming it. Workers are reached over https verified against the
system's trust store or ``--ca-cert``; plain http only on loopback or with ``--insecure``.

The worker is not trusted with the owner's memory: every response is read up to a cap
(counted after any content decoding, so a compressed bomb stops at the cap too), an
oversized one is retried like a lost connection, and a malformed one (bad JSON, missing
fields, an unreadable codec) raises WorkerError instead of an uncaught exception.
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import torch

from hetune.compile.manifest import Manifest
from hetune.crypto.registry import get_scheme
from hetune.errors import ConfigError, HetuneError, WorkerError
from hetune.protocols.hybrid_lora import wire
from hetune.protocols.hybrid_lora.owner.connection import connection_error
from hetune.quant.integer import OpCodec


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # after the first try; waits backoff_s * 2^attempt between tries (31.5 s in all: a worker restart)
    backoff_s: float = 0.5
    timeout_s: float = 600.0  # one request; a big encrypted product takes minutes on CPU


DEFAULT_RETRY = RetryPolicy()
MAX_INFO_BYTES = 256 * 2**20  # /info, /codec and session JSON: a Llama-3-8B codec is about 11 MB
RESULT_BYTES_FACTOR = 16  # result <= this x a request of its shape (RLWE: 2 values of <= 8 bytes per 6-byte input; GLWE: 0.7-1.3x measured)
MAX_RETRY_AFTER_S = 120.0  # a worker's Retry-After beyond this is not believed
CONNECT_TIMEOUT_S = 5.0  # a worker that does not accept a connection within this is down or firewalled
API_KEY_ENV = "HETUNE_API_KEY"
_API_KEY_HINT = f"set {API_KEY_ENV} or pass --api-key-file with the key the worker's operator made with `hetune keys new`"


@dataclass(frozen=True)
class WorkerAccess:
    """How the data owner reaches its workers: whom to trust over https, and its admission key."""

    ca_cert: Path | None = None  # trust only this CA (PEM) for https; None: the system's trust store
    insecure: bool = False  # allow plain http:// to a host other than loopback
    api_key: str | None = field(default=None, repr=False)  # sent to open a session and to read the worker's status

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
        if parts.scheme == "http" and not self.insecure and not wire.is_loopback(parts.hostname):
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


class Sink(Protocol):
    """Where a streamed result goes as it arrives: a file (a hint), a decryptor (a product)."""

    def begin(self) -> None:
        """Start afresh (called before each try's first byte)."""

    def write(self, chunk: bytes) -> None: ...


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


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

    def _receive(self, method: str, path: str, max_bytes: int, sink: Sink | None = None, **kwargs):
        """The response with its body read whole, or _TooLarge once it passes ``max_bytes`` (decoded).
        With ``sink``, a 200's body goes to the sink as it arrives (never held whole; the returned body is empty)."""
        import httpx

        with self.http.stream(method, path, **kwargs) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _TooLarge(int(declared))
            streamed = sink is not None and response.status_code == 200
            if streamed:
                sink.begin()  # each try starts the sink afresh: a retry never appends to a broken download
            chunks, total = [], 0
            for chunk in response.iter_bytes():  # after content decoding: a gzip bomb is counted as it inflates
                total += len(chunk)
                if total > max_bytes:
                    raise _TooLarge(total)
                if streamed:
                    sink.write(chunk)
                else:
                    chunks.append(chunk)
        plain = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(response.status_code, headers=plain, content=b"".join(chunks), request=response.request)

    def _request(self, method: str, path: str, max_bytes: int = MAX_INFO_BYTES, content: bytes | None = None,
                 remake=None, sink: Sink | None = None, **kwargs):
        """``remake``: a callable that makes a fresh body for each retry (a product is re-encrypted, never resent)."""
        import httpx

        for attempt in range(self.retry.retries + 1):
            wait = self.retry.backoff_s * 2**attempt
            try:
                body = remake() if remake is not None and attempt else content
                response = self._receive(method, path, max_bytes, sink=sink, content=body, **kwargs)
            except _TooLarge as err:  # never held whole: retried like a lost connection
                problem = f"worker {self.url} sent a response of over {max_bytes} bytes ({err.size} so far) to {method} {path}"
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
                wait = min(float(retry_after), MAX_RETRY_AFTER_S) if retry_after.isdigit() else wait  # a 429 says when
            if attempt < self.retry.retries:
                time.sleep(wait)
        raise WorkerError(problem, "check that `hetune serve` is still running there")

    def _checked(self, response, what: str, hint: str | None = None):
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            raise WorkerError(f"worker {self.url} refused {what}: {response.status_code} {detail[:500]}", hint)
        return response

    def _malformed(self, what: str, err: BaseException) -> WorkerError:
        return WorkerError(f"worker {self.url} sent a malformed {what}: {type(err).__name__}: {str(err)[:200]}",
                           "check that the URL names a hetune worker of this version; resume from the last checkpoint once it does")

    def _json(self, response, what: str, fields: tuple[str, ...]) -> dict:
        try:
            data = response.json()
            if not isinstance(data, dict) or any(f not in data for f in fields):
                raise ValueError(f"expected a JSON object with {', '.join(fields)}")
            return data
        except ValueError as err:
            raise self._malformed(what, err) from None

    def _status_headers(self) -> dict:
        return {"authorization": f"Bearer {self._access.api_key}"} if self._access.api_key else {}

    def info(self) -> dict:
        response = self._checked(self._request("GET", "/info", headers=self._status_headers()), "info", self._key_hint(401))
        return self._json(response, "info", ("manifest",))

    def codec_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        response = self._checked(self._request("GET", "/codec", headers=self._status_headers()), "codec")
        try:
            return load(response.content)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise self._malformed("codec", err) from None

    @staticmethod
    def _key_hint(status: int) -> str | None:
        return _API_KEY_HINT if status == 401 else None

    def open(self, params, session_key: bytes) -> None:
        """A new session for the keys' scheme and parameter set; ``session_key`` is b"" for batched RLWE."""
        self._key, self._params = session_key, params
        query = {"scheme": params.scheme, "param_set": params.name}
        response = self._request("POST", "/sessions", content=session_key, params=query, headers=self._status_headers())
        data = self._json(self._checked(response, "a new session", self._key_hint(response.status_code)), "session",
                          ("session_id", "token"))
        if not all(isinstance(data[f], str) and data[f].isprintable() and len(data[f]) < 4096 for f in ("session_id", "token")):
            raise self._malformed("session", ValueError("session_id and token must be short printable strings"))
        served = data.get("outsourced_sha256")
        if self.fingerprint is not None and served != self.fingerprint:  # e.g. restarted on another bundle since /info
            self.close_session(data["session_id"], data["token"])
            raise WorkerError(f"worker {self.url} opened a session on other weights (outsourced weights sha256 "
                              f"{str(served)[:12]}) than the bundle checked against the local model ({self.fingerprint[:12]})",
                              "serve the bundle compiled from your model on that worker, then rerun (with --resume if a run had started)")
        self.session_id, self._token = data["session_id"], data["token"]

    def run(self, op: str, direction: str, payload, rows: int, cols: int, max_bytes: int = MAX_INFO_BYTES,
            sink: Sink | None = None) -> tuple[bytes, float]:
        """The result body (at most ``max_bytes``) and the worker's seconds (its ``x-worker-seconds`` header);
        ``payload``: bytes, or a callable that makes a fresh request body for each try. With ``sink`` the worker
        streams the result into it as it is computed (body b"", seconds 0: the worker cannot know them up front)."""
        path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
        query = {"rows": rows, "cols": cols, **({"stream": "true"} if sink is not None else {})}
        for reopened in (False, True):
            body = payload() if callable(payload) else payload
            headers = {"authorization": f"Bearer {self._token}", "content-type": "application/octet-stream"}
            if not isinstance(body, bytes):  # made as it is sent (pipelined): its exact size up front, not chunked
                headers["content-length"] = str(get_scheme(self._params.scheme).request_bytes(self._params, rows, cols))
            response = self._request(
                "POST", path, max_bytes=max_bytes, content=body,
                remake=payload if callable(payload) else None, sink=sink, params=query, headers=headers,
            )
            if response.status_code == 404 and "session" in response.text and not reopened:
                self.open(self._params, self._key)  # the worker restarted or the session expired
                path = f"/sessions/{self.session_id}/{wire.op_path(op, direction)}"
                continue
            response = self._checked(response, f"{op} {direction}")
            try:
                seconds = float(response.headers.get("x-worker-seconds", 0.0))
            except ValueError:
                seconds = 0.0  # a timing header is for statistics only
            return response.content, seconds
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
        manifests = []
        for client, info in zip(self.clients, infos):
            try:
                manifests.append(Manifest.from_dict(info["manifest"]))
            except (KeyError, TypeError, ValueError, AttributeError, HetuneError) as err:
                raise client._malformed("manifest", err) from None
        self.manifest = manifests[0]
        for client, manifest in zip(self.clients[1:], manifests[1:]):
            if manifest.model.weights_sha256 != self.manifest.model.weights_sha256:
                raise WorkerError(f"worker {client.url} serves a different bundle than {self.clients[0].url}")
        self._by_op = {op.name: self.clients[max(op.layer, 0) % len(self.clients)] for op in self.manifest.ops}

    def codecs(self) -> dict[str, OpCodec]:
        tensors = self.clients[0].codec_tensors()
        for op in self.manifest.ops:
            for name in (op.scale_key, op.rowsum_key):
                if name not in tensors or tuple(tensors[name].shape) != (op.out_features,):
                    raise self.clients[0]._malformed("codec", ValueError(f"{name} is missing or not of shape ({op.out_features},)"))
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

    @property
    def weights_sha256(self) -> str:
        return self.manifest.model.weights_sha256

    def run(self, op: str, direction: str, payload, rows: int, cols: int, sink: Sink | None = None) -> tuple[bytes, float]:
        client = self._by_op[op]
        spec = self.manifest.op(op)
        out_cols = spec.out_features if direction == "forward" else spec.in_features
        params = client._params
        cap = RESULT_BYTES_FACTOR * get_scheme(params.scheme).request_bytes(params, rows, out_cols) + 2**16
        return client.run(op, direction, payload, rows, cols, cap, sink)

    def close(self) -> None:
        for client in self.clients:
            client.close()
