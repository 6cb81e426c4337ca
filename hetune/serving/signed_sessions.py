"""Sessions that live in signed, expiring tokens, so any replica behind one endpoint can check them.

Why: with batched RLWE a worker session holds no key, only an authorization (scheme and
parameter set), so it can travel in its token instead of in one process's memory. The
replicas share an HMAC-SHA256 key (a file, or $HETUNE_SESSION_KEY; never logged) and
whichever gets a request checks signature, session id and expiry itself. Closing a session
puts its id on a revocation list (:class:`Revocations`, a Ray actor on a cluster) that every
replica consults, until the session's tokens would have expired anyway.

Token: ``v1.<claims>.<tag>``, claims the unpadded base64url of the JSON
``{"sid", "scheme", "set", "exp", "own"}`` (exp in Unix seconds; own the API-key owner who
opened it, or null with admission open, so any replica charges the right owner), tag the unpadded base64url of
HMAC-SHA256(key, ``v1.<claims>``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from hetune.crypto.scheme import ParamSet
from hetune.errors import ConfigError

KEY_ENV = "HETUNE_SESSION_KEY"
MIN_KEY_BYTES = 32
_VERSION = "v1"
KEY_HINT = (
    "make one with `python -c \"import secrets; print(secrets.token_urlsafe(32))\" > session.key` (mode 0600) at the same "
    f"path on every node and pass --session-key-file, or set {KEY_ENV} in every node's environment before `ray start`"
)


def load_session_key(path: Path | None = None) -> bytes | None:
    """The replicas' shared key from ``path``, else from $HETUNE_SESSION_KEY; None when neither is given."""
    if path is not None:
        try:
            key, source = Path(path).read_bytes().strip(), str(path)
        except OSError as err:
            raise ConfigError(f"cannot read the session key file {path}: {err.strerror or err}", KEY_HINT) from err
    else:
        key, source = os.environ.get(KEY_ENV, "").strip().encode(), f"${KEY_ENV}"
        if not key:
            return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the session key in {source} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed", KEY_HINT)
    return key


@dataclass(frozen=True)
class Claims:
    session_id: str
    scheme: str
    param_set: str
    expires: int  # Unix seconds: replicas on several machines need synchronised clocks (NTP)
    owner: str | None = None  # who opened the session (admission by API key), charged for its requests


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SessionTokens:
    """Issues and checks tokens under one key (kept out of ``repr``)."""

    def __init__(self, key: bytes):
        self._key = key

    def __repr__(self) -> str:
        return "SessionTokens(<key hidden>)"

    def _tag(self, claims: str) -> bytes:
        return _b64(hmac.new(self._key, f"{_VERSION}.{claims}".encode(), hashlib.sha256).digest()).encode()

    def issue(self, claims: Claims) -> str:
        data = {"sid": claims.session_id, "scheme": claims.scheme, "set": claims.param_set, "exp": claims.expires,
                "own": claims.owner}
        body = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{_VERSION}.{body}.{self._tag(body).decode()}"

    def verify(self, token: str | None) -> Claims | None:
        """The claims of a token signed with this key, expired or not; None for anything else."""
        parts = (token or "").split(".")
        if len(parts) != 3 or parts[0] != _VERSION or not hmac.compare_digest(parts[2].encode(), self._tag(parts[1])):
            return None
        data = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))  # ours: well-formed
        return Claims(data["sid"], data["scheme"], data["set"], data["exp"], data.get("own"))


class Revocations(Protocol):
    """Closed session ids, shared by every replica."""

    def revoke(self, session_id: str, until: float) -> None: ...

    def is_revoked(self, session_id: str) -> bool: ...


class _Record(Protocol):
    token: str
    params: ParamSet
    owner: str | None


R = TypeVar("R", bound=_Record)


class SignedSessions(Generic[R]):
    """A drop-in for :class:`~hetune.serving.sessions.SessionStore` whose sessions live in their tokens.

    Each request's record is rebuilt from its token's claims (``rebuild``), so a scheme that
    needs per-session state (GLWE's compression key) cannot use it. A token expires
    ``ttl_s`` after it was issued, whether used or not; the client then opens a new session.
    ``len``, ``in`` and ``count`` see the sessions opened through this replica that are still
    live (for /health); there is no cluster-wide session cap. Per-owner limits across
    replicas are kept by the app's admission ledger (``ray_serve``), not here.
    """

    def __init__(self, tokens: SessionTokens, ttl_s: float, revocations: Revocations, rebuild: Callable[[Claims, str], R]):
        self.ttl_s, self._tokens, self._revocations, self._rebuild = ttl_s, tokens, revocations, rebuild
        self._opened: dict[str, tuple[float, R]] = {}  # session id -> (expiry, record), sessions opened here
        self._lock = threading.Lock()

    def expire(self) -> None:
        now = time.time()
        with self._lock:
            self._opened = {sid: opened for sid, opened in self._opened.items() if opened[0] > now}

    def reserve(self):
        """No cap to hold a place under (the interface of :meth:`SessionStore.reserve`)."""
        return nullcontext()

    def create(self, make: Callable[[str], R], reserved: bool = False) -> tuple[str, str]:
        """A new (session id, token); of the record ``make`` builds only its scheme, set and owner are kept, in the token."""
        record = make("")
        sid, expires = secrets.token_hex(16), int(time.time() + self.ttl_s)
        token = self._tokens.issue(Claims(sid, record.params.scheme, record.params.name, expires, record.owner))
        with self._lock:
            self._opened[sid] = (expires, record)
        return sid, token

    def get(self, sid: str, token: str | None) -> R | None | bool:
        """The session; None if it expired or was closed; False if the token is not ours or is another session's."""
        claims = self._tokens.verify(token)
        if claims is None or claims.session_id != sid:
            return False
        if claims.expires <= time.time() or self._revocations.is_revoked(sid):
            return None
        return self._rebuild(claims, token)

    def close(self, sid: str) -> None:
        self._revocations.revoke(sid, time.time() + self.ttl_s)  # no token of it outlives that
        with self._lock:
            self._opened.pop(sid, None)

    def count(self, where: Callable[[R], bool]) -> int:
        self.expire()
        with self._lock:
            return sum(where(record) for _, record in self._opened.values())

    def __len__(self) -> int:
        self.expire()
        return len(self._opened)

    def __contains__(self, sid: str) -> bool:
        self.expire()
        return sid in self._opened
