"""What every data owner's HTTP client does the same way, whatever protocol it speaks.

:class:`HttpClient` is the base the protocols' clients build on (hybrid LoRA's
``WorkerClient``, SFPrompt's ``BodyClient``): an httpx client under ``URL/API_VERSION``,
verified against the system's trust store or a given CA, plain http only on loopback or
when told ``insecure``; retries of a lost connection or a 5xx with exponential backoff,
of a 429 after the ``Retry-After`` the server names; a failure before the server has
answered once reported at once in the user's terms (:mod:`hetune.net.connection`).

The server is not trusted with the owner's memory: every response is read up to a cap
(counted after any content decoding, so a compressed bomb stops at the cap too), an
oversized one is retried like a lost connection, and malformed JSON raises WorkerError
instead of an uncaught exception.
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from hetune.errors import ConfigError, WorkerError
from hetune.net import is_loopback
from hetune.net.connection import connection_error

MAX_INFO_BYTES = 256 * 2**20  # JSON answers and status: a Llama-3-8B codec is about 11 MB
MAX_RETRY_AFTER_S = 120.0  # a server's Retry-After beyond this is not believed
CONNECT_TIMEOUT_S = 5.0  # a server that does not accept a connection within this is down or firewalled
API_KEY_ENV = "HETUNE_API_KEY"
API_KEY_HINT = f"set {API_KEY_ENV} or pass --api-key-file with the key the worker's operator made with `hetune keys new`"


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # after the first try; waits backoff_s * 2^attempt between tries (31.5 s in all: a worker restart)
    backoff_s: float = 0.5
    timeout_s: float = 600.0  # one request; a big encrypted product takes minutes on CPU


@dataclass(frozen=True)
class WorkerAccess:
    """How the data owner reaches a server: whom to trust over https, and its admission key."""

    ca_cert: Path | None = None  # trust only this CA (PEM) for https; None: the system's trust store
    insecure: bool = False  # allow plain http:// to a host other than loopback
    api_key: str | None = field(default=None, repr=False)  # sent to open a session and to read the server's status

    @classmethod
    def load(cls, ca_cert: Path | None = None, insecure: bool = False, api_key_file: Path | None = None) -> "WorkerAccess":
        """The API key comes from ``api_key_file``, else from $HETUNE_API_KEY: never from the command line, where `ps` shows it."""
        if api_key_file is not None:
            try:
                key = Path(api_key_file).read_text().strip()
            except OSError as err:
                raise ConfigError(f"cannot read --api-key-file {api_key_file}: {err.strerror or err}", API_KEY_HINT) from err
        else:
            key = os.environ.get(API_KEY_ENV, "").strip()
        return cls(ca_cert, insecure, key or None)

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"worker URL {url!r} is not an http(s) address", "pass --worker https://HOST:PORT")
        if parts.scheme == "http" and not self.insecure and not is_loopback(parts.hostname):
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

    def headers(self) -> dict:
        """The API key as a bearer header (none without a key)."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


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


class _Undecodable(Exception):
    """A response body in a content encoding we cannot read within bounds (or a corrupt one)."""


_INFLATE_STEP = 1 << 20  # decoded bytes per zlib call: a compressed bomb never inflates by more than this at once
_ZLIB_WBITS = {"gzip": 16 + 15, "deflate": 15}


def _decoded(raw_chunks, encoding: str):
    """The body's decoded pieces, each at most _INFLATE_STEP bytes. We ask for identity (no server of ours
    compresses), but a proxy may gzip anyway; httpx's own decoder inflates a whole network read at once
    (about 1,000x for gzip), which would let a 64 KB read become 64 MB before any cap is checked."""
    import zlib

    if encoding in ("", "identity"):
        yield from raw_chunks
        return
    if encoding not in _ZLIB_WBITS:
        raise _Undecodable(f"content-encoding {encoding!r}, which hetune does not read (it asks for identity)")
    inflater = zlib.decompressobj(_ZLIB_WBITS[encoding])
    try:
        for data in raw_chunks:
            while data:
                yield inflater.decompress(data, _INFLATE_STEP)
                data = inflater.unconsumed_tail
        yield inflater.flush()
    except zlib.error as err:
        raise _Undecodable(f"a corrupt {encoding} body ({err})") from None
    if not inflater.eof:
        raise _Undecodable(f"a truncated {encoding} body")


class HttpClient:
    """One server under ``url/api_version``: requests with retries and capped responses, errors as WorkerError.

    ``down_hint``: what to tell the user when the server stays away."""

    def __init__(self, url: str, api_version: str, retry: RetryPolicy, access: WorkerAccess | None = None,
                 down_hint: str = "check that `hetune serve` is still running there"):
        import httpx

        self.url = url.rstrip("/")
        self.retry = retry
        self._access = access or WorkerAccess()
        self._access.check_url(self.url)
        self._down_hint = down_hint
        self.http = httpx.Client(base_url=f"{self.url}/{api_version}", verify=self._access.ssl_context(),
                                 timeout=httpx.Timeout(self.retry.timeout_s, connect=CONNECT_TIMEOUT_S),
                                 headers={"accept-encoding": "identity"})
        self._reached = False  # until the server first answers, a failure is a set-up mistake: reported, not retried

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
            encoding = response.headers.get("content-encoding", "").strip().lower()
            for chunk in _decoded(response.iter_raw(), encoding):  # a compressed bomb is counted as it inflates
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
        """The response (status < 500, or the last try's); ``remake``: a callable that makes a fresh body
        for each retry (a product is re-encrypted, never resent); ``sink``: see :meth:`_receive`."""
        import httpx

        for attempt in range(self.retry.retries + 1):
            wait = self.retry.backoff_s * 2**attempt
            try:
                body = remake() if remake is not None and attempt else content
                response = self._receive(method, path, max_bytes, sink=sink, content=body, **kwargs)
            except _TooLarge as err:  # never held whole: retried like a lost connection
                problem = f"worker {self.url} sent a response of over {max_bytes} bytes ({err.size} so far) to {method} {path}"
            except _Undecodable as err:
                problem = f"worker {self.url} sent {err} to {method} {path}"
            except httpx.TransportError as err:
                if not self._reached or _certificate_failure(err):  # retrying cannot help; the server may be an impostor
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
        raise WorkerError(problem, self._down_hint)

    def _checked(self, response, what: str, hint: str | None = None):
        """``response`` if it succeeded; a WorkerError with the server's error message otherwise."""
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            raise WorkerError(f"worker {self.url} refused {what}: {response.status_code} {detail[:500]}", hint)
        return response

    def _malformed(self, what: str, err: BaseException) -> WorkerError:
        return WorkerError(f"worker {self.url} sent a malformed {what}: {type(err).__name__}: {str(err)[:200]}",
                           "check that the URL names a hetune server of this version; resume from the last checkpoint once it does")

    def _json(self, response, what: str, fields: tuple[str, ...]) -> dict:
        try:
            data = response.json()
            if not isinstance(data, dict) or any(f not in data for f in fields):
                raise ValueError(f"expected a JSON object with {', '.join(fields)}")
            return data
        except ValueError as err:
            raise self._malformed(what, err) from None

    def _session(self, response, what: str = "session") -> dict:
        """A session-open answer: a JSON object whose session_id and token are short printable strings."""
        data = self._json(response, what, ("session_id", "token"))
        if not all(isinstance(data[f], str) and data[f].isprintable() and len(data[f]) < 4096 for f in ("session_id", "token")):
            raise self._malformed(what, ValueError("session_id and token must be short printable strings"))
        return data

    def close_session(self, session_id: str, token: str) -> None:
        try:
            self.http.delete(f"/sessions/{session_id}", headers={"authorization": f"Bearer {token}"})
        except Exception:  # closing is best effort: the session expires anyway
            pass
