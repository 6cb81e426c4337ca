"""Sessions that live in signed, expiring tokens, so any replica behind one endpoint can check them.

Why: with batched RLWE a worker session holds no key, only an authorization (scheme and
parameter set), so it can travel in its token instead of in one process's memory. The
replicas share an HMAC-SHA256 key (a file, or $HETUNE_SESSION_KEY; never logged) and
whichever gets a request checks signature, session id and expiry itself. What replicas must
agree on lives in one :class:`SessionLedger` (a Ray actor on a cluster): the live sessions
(for the caps), closed ones until their tokens would have expired anyway, and each owner's
request rate.

The ledger also holds the app's budget for request bodies in flight (:class:`LedgerBodies`),
so N replicas share one budget instead of holding N. It lives in memory, so a restart
forgets it; what it forgets is made harmless, not restored: its tables get a new random
epoch that every token carries (tokens of an earlier ledger are void, so a closed session
cannot come back and the session caps count every usable session), its buckets restart
empty (as if spent at the restart), and it grants no body reservation until every live
replica has re-reported its holds (one lease).

Token: ``v1.<claims>.<tag>``, claims the unpadded base64url of the JSON
``{"sid", "scheme", "set", "exp", "own", "ep"}`` (exp in Unix seconds; own the API-key owner who
opened it, or null with admission open, so any replica charges the right owner; ep the
ledger's epoch when it was opened), tag the unpadded base64url of HMAC-SHA256(key, ``v1.<claims>``).
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
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from hetune.crypto.scheme import ParamSet
from hetune.errors import ConfigError
from hetune.serving.admission import TokenBucket
from hetune.serving.http_api import Refusal
from hetune.serving.sessions import SessionLimitError

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
    epoch: str | None = None  # the ledger's epoch when it was opened: void once the ledger restarts


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
                "own": claims.owner, "ep": claims.epoch}
        body = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{_VERSION}.{body}.{self._tag(body).decode()}"

    def verify(self, token: str | None) -> Claims | None:
        """The claims of a token signed with this key, expired or not; None for anything else."""
        parts = (token or "").split(".")
        if len(parts) != 3 or parts[0] != _VERSION or not hmac.compare_digest(parts[2].encode(), self._tag(parts[1])):
            return None
        data = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))  # ours: well-formed
        return Claims(data["sid"], data["scheme"], data["set"], data["exp"], data.get("own"), data.get("ep"))


class SessionLedger(Protocol):
    """What every replica must agree on: live sessions (for the caps), closed ones until their tokens
    expire, each owner's request bucket, and the bytes of request bodies each replica holds.
    :class:`LocalLedger` in one process; a Ray actor over it on a cluster (``ray_serve``)."""

    def open(self, session_id: str, owner: str | None, until: float, max_sessions: int,
             owner_sessions: int | None) -> tuple[str | None, str]: ...

    def revoke(self, session_id: str, until: float) -> None: ...

    def check(self, session_id: str, epoch: str | None) -> str | None: ...

    def live(self, owner: str | None = None) -> int: ...

    def take(self, owner: str, per_minute: int) -> float: ...

    def reserve(self, replica: str, holder: str, size: int, total: int, per_holder: int, lease_s: float) -> str | None: ...

    def release(self, replica: str, holder: str, size: int) -> None: ...

    def renew(self, replica: str, held: Mapping[str, int], lease_s: float) -> None: ...


HEARTBEAT_S = 2.0  # how often a replica re-reports the body bytes it holds to the ledger
LEASE_S = 3 * HEARTBEAT_S  # a replica's holds outlive its last report by this much (then it is taken for dead)


class LocalLedger:
    """:class:`SessionLedger` in memory. Every table is bounded: live sessions by ``max_sessions``,
    closed ones by the opens within one TTL, buckets by the owners in the keys file, body holds
    by the requests in flight.

    ``restarted``: this ledger replaces one that was lost (a Ray actor restart). Its epoch is new
    anyway; its buckets then start as if emptied at the restart, and it grants no body reservation
    for one lease, until every live replica has re-reported what it holds.
    """

    def __init__(self, restarted: bool = False) -> None:
        self.epoch = secrets.token_urlsafe(16)  # new on every start: tokens minted under an earlier ledger are void
        self._live: dict[str, tuple[str | None, float]] = {}  # session id -> (owner, token expiry)
        self._closed: dict[str, float] = {}  # session id -> when its last token expires
        self._buckets: dict[str, tuple[int, TokenBucket]] = {}
        self._bodies: dict[str, tuple[float, Counter[str]]] = {}  # replica -> (lease end, holder -> bytes held)
        self._started = time.monotonic()
        self._restarted = restarted
        self._blind_until = self._started + LEASE_S if restarted else 0.0
        self._lock = threading.Lock()

    def _prune(self) -> None:
        now = time.time()
        self._live = {sid: v for sid, v in self._live.items() if v[1] > now}
        self._closed = {sid: t for sid, t in self._closed.items() if t > now}

    def open(self, session_id: str, owner: str | None, until: float, max_sessions: int,
             owner_sessions: int | None) -> tuple[str | None, str]:
        """Record a new session: (None, the epoch to sign into its token), or ("worker" or "owner", ...) and
        nothing recorded if that cap is full."""
        with self._lock:
            self._prune()
            if len(self._live) >= max_sessions:
                return "worker", self.epoch
            if owner is not None and owner_sessions is not None and \
                    sum(o == owner for o, _ in self._live.values()) >= owner_sessions:
                return "owner", self.epoch
            self._live[session_id] = (owner, until)
            return None, self.epoch

    def revoke(self, session_id: str, until: float) -> None:
        with self._lock:
            self._prune()
            self._live.pop(session_id, None)
            self._closed[session_id] = until

    def check(self, session_id: str, epoch: str | None) -> str | None:
        """None for a usable session; "stale" if it was opened under an earlier ledger, "closed" if it was closed."""
        if epoch != self.epoch:
            return "stale"
        return "closed" if session_id in self._closed else None

    def live(self, owner: str | None = None) -> int:
        with self._lock:
            self._prune()
            return sum(owner is None or o == owner for o, _ in self._live.values())

    def take(self, owner: str, per_minute: int) -> float:
        """One request of ``owner`` against a bucket of ``per_minute``: 0, or the seconds to wait."""
        with self._lock:
            if self._buckets.get(owner, (None,))[0] != per_minute:
                bucket = TokenBucket(per_minute, per_minute / 60)
                if self._restarted:  # as if spent at the restart: the lost bucket may have been
                    bucket.tokens = min(bucket.capacity, (time.monotonic() - self._started) * bucket.rate)
                self._buckets[owner] = (per_minute, bucket)
            return self._buckets[owner][1].take()

    def _holds(self) -> dict[str, tuple[float, Counter[str]]]:
        now = time.monotonic()
        self._bodies = {replica: v for replica, v in self._bodies.items() if v[0] > now}
        return self._bodies

    def reserve(self, replica: str, holder: str, size: int, total: int, per_holder: int, lease_s: float) -> str | None:
        """Hold ``size`` body bytes for ``holder`` on ``replica``; "holder" or "total" (nothing held) if that budget
        is taken, "restarting" during a restarted ledger's first lease."""
        with self._lock:
            now = time.monotonic()
            if now < self._blind_until:
                return "restarting"
            holds = self._holds()
            if sum(held[holder] for _, held in holds.values()) + size > per_holder:
                return "holder"
            if sum(sum(held.values()) for _, held in holds.values()) + size > total:
                return "total"
            held = holds.get(replica, (0.0, Counter()))[1]
            held[holder] += size
            holds[replica] = (now + lease_s, held)
            return None

    def release(self, replica: str, holder: str, size: int) -> None:
        with self._lock:
            held = self._bodies.get(replica, (0.0, Counter()))[1]
            held[holder] -= size
            if held[holder] <= 0:
                del held[holder]

    def renew(self, replica: str, held: Mapping[str, int], lease_s: float) -> None:
        """``replica`` is alive and holds exactly ``held`` (holder -> bytes): its report replaces what was recorded."""
        with self._lock:
            self._holds()[replica] = (time.monotonic() + lease_s, Counter(held))


class LedgerBodies:
    """One replica's side of the app's body budget in the ledger (the ``shared`` of a
    :class:`~hetune.serving.http_api.BodyBudget`). The budget calls it under its own lock, so
    the ledger sees this replica's reservations, releases and reports in the order they were made."""

    def __init__(self, ledger: SessionLedger, replica: str, lease_s: float = LEASE_S):
        self._ledger, self.replica, self.lease_s = ledger, replica, lease_s

    def reserve(self, holder: str, size: int, total: int, per_holder: int) -> str | None:
        return self._ledger.reserve(self.replica, holder, size, total, per_holder, self.lease_s)

    def release(self, holder: str, size: int) -> None:
        self._ledger.release(self.replica, holder, size)

    def renew(self, held: Mapping[str, int]) -> None:
        self._ledger.renew(self.replica, held, self.lease_s)


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
    The caps (``max_sessions`` in all, ``owner_sessions`` per owner with API keys) and the
    counts hold across replicas: they are kept in the shared ``ledger``, not here.
    """

    def __init__(self, tokens: SessionTokens, ttl_s: float, ledger: SessionLedger, rebuild: Callable[[Claims, str], R],
                 max_sessions: int, owner_sessions: int | None = None):
        self.ttl_s, self._tokens, self._ledger, self._rebuild = ttl_s, tokens, ledger, rebuild
        self.max_sessions, self.owner_sessions = max_sessions, owner_sessions

    def reserve(self):
        """No place to hold here: the ledger checks the caps when the session is recorded (:meth:`create`)."""
        return nullcontext()

    def create(self, make: Callable[[str], R], reserved: bool = False) -> tuple[str, str]:
        """A new (session id, token); of the record ``make`` builds only its scheme, set and owner are kept, in the token.
        Raises SessionLimitError (naming the owner if it is that owner's cap) when the ledger's caps are full."""
        record = make("")
        sid, expires = secrets.token_hex(16), int(time.time() + self.ttl_s)
        full, epoch = self._ledger.open(sid, record.owner, expires, self.max_sessions, self.owner_sessions)
        if full:
            raise SessionLimitError(record.owner if full == "owner" else None)
        return sid, self._tokens.issue(Claims(sid, record.params.scheme, record.params.name, expires, record.owner, epoch))

    def get(self, sid: str, token: str | None) -> R | None | bool:
        """The session; None if it expired or was closed; False if the token is not ours or is another session's;
        a 404 Refusal saying so if it was opened under an earlier ledger (the owner's client opens a new one)."""
        claims = self._tokens.verify(token)
        if claims is None or claims.session_id != sid:
            return False
        if claims.expires <= time.time():
            return None
        state = self._ledger.check(sid, claims.epoch)
        if state == "stale":
            raise Refusal(404, "session opened before the worker's session ledger restarted, which voids every earlier "
                               "session; open a new session")
        return None if state else self._rebuild(claims, token)

    def close(self, sid: str) -> None:
        self._ledger.revoke(sid, time.time() + self.ttl_s)  # no token of it outlives that

    def owned_by(self, owner: str) -> int:
        return self._ledger.live(owner)

    def __len__(self) -> int:
        return self._ledger.live()
