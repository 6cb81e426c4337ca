"""Admission of data owners by API key, with per-owner limits on sessions and request rate.

Why: a worker reachable over a network serves whoever finds its port. With
``hetune serve --api-keys FILE`` only holders of a listed key open sessions or read the
status endpoints (401 otherwise), each owner has at most ``sessions`` sessions at once and
``requests_per_minute`` requests (both 429 with ``Retry-After``). The file holds one ``owner sha256hex`` line per
owner: the worker never stores a key, and since a key is 256 random bits its plain
SHA-256 is safe to keep (there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hetune.errors import ConfigError
from hetune.serving.http_api import Refusal

KEY_PREFIX = "htk_"  # so a leaked key is recognisable in a scan
_OWNER = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")
_HINT_KEYS = "each line is `OWNER SHA256HEX`; add owners with `hetune keys new --owner NAME --keys-file FILE`"


@dataclass(frozen=True)
class OwnerLimits:
    sessions: int = 2  # concurrent sessions per owner
    requests_per_minute: int = 600  # sustained rate; a burst of up to a minute's worth is allowed

    def __post_init__(self) -> None:
        for name in ("sessions", "requests_per_minute"):
            if getattr(self, name) < 1:
                raise ConfigError(f"owner {name}={getattr(self, name)} must be >= 1", "pass a positive --owner-sessions / --owner-rpm")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys_file(path: Path) -> dict[str, str]:
    """owner -> SHA-256 hex of its key; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read API keys file {path}: {err.strerror or err}", _HINT_KEYS) from err
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or not _OWNER.fullmatch(fields[0]) or not _HEX.fullmatch(fields[1]):
            raise ConfigError(f"{path} line {number} is not `OWNER SHA256HEX`", _HINT_KEYS)
        if fields[0] in keys:
            raise ConfigError(f"{path} line {number}: owner {fields[0]!r} is listed twice", "keep one line per owner")
        keys[fields[0]] = fields[1]
    return keys


def add_owner(path: Path, owner: str) -> str:
    """A new random key for ``owner``; appends its hash to ``path`` (created 0600) and returns the key, which is kept nowhere."""
    if not _OWNER.fullmatch(owner):
        raise ConfigError(f"owner name {owner!r} is not allowed", "use 1 to 64 letters, digits, '.', '_' or '-'")
    path = Path(path)
    if path.exists() and owner in read_keys_file(path):
        raise ConfigError(f"owner {owner!r} already has a key in {path}", "delete its line to revoke it, or pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(f"{owner} {key_hash(key)}\n")
    except OSError as err:
        raise ConfigError(f"cannot write API keys file {path}: {err.strerror or err}", "check the directory exists and is writable") from err
    return key


class TokenBucket:
    """Token bucket: ``rate`` per second, holding at most ``capacity``."""

    def __init__(self, capacity: float, rate: float):
        self.capacity, self.rate, self.tokens, self.stamp = capacity, rate, capacity, time.monotonic()

    def take(self) -> float:
        """0 if a request may go now (and counts it), else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class LocalRates:
    """A token bucket per owner, in this process."""

    def __init__(self, owners: Iterable[str], limits: OwnerLimits):
        self._buckets = {owner: TokenBucket(limits.requests_per_minute, limits.requests_per_minute / 60) for owner in owners}
        self._lock = threading.Lock()

    def take(self, owner: str) -> float:
        with self._lock:
            return self._buckets[owner].take()


class Admission:
    """Who may use the worker, and each owner's limits. The worker's route dependencies call it, so
    it judges the routed request (path parameters, not ``request.url``) before its handler runs.

    Order on every request: authenticate (an API key; on session routes the session's token,
    whose session names its owner), then charge that owner one request. A stranger's failed
    tries therefore never cost an owner anything. ``sessions_of(owner)`` counts an owner's live
    sessions (closed and expired ones do not count); ``take(owner)`` counts one request and
    returns 0, or the seconds until the owner may send one (default: buckets in this process;
    on Ray Serve the app's shared ledger).
    """

    SESSION_FULL_RETRY_S = 5  # an owner at its session cap: a previous run's session may be closing

    def __init__(self, keys: dict[str, str], limits: OwnerLimits, sessions_of: Callable[[str], int],
                 take: Callable[[str], float] | None = None):
        self.keys, self.limits, self._sessions_of = keys, limits, sessions_of
        self._take = take or LocalRates(keys, limits).take
        self._opening: Counter[str] = Counter()  # owner -> session opens in progress here
        self._lock = threading.Lock()

    def owner(self, key: str | None) -> str | None:
        """The owner whose key this is; every entry is compared, in constant time."""
        if not key:
            return None
        digest, found = key_hash(key), None
        for owner, expected in self.keys.items():
            if hmac.compare_digest(digest, expected):
                found = owner
        return found

    def authenticate(self, key: str | None) -> str:
        """The owner of an API key; a 401 Refusal for a missing or unknown one."""
        owner = self.owner(key)
        if owner is None:
            raise Refusal(401, "missing or unknown API key: send `Authorization: Bearer <key>`")
        return owner

    def charge(self, owner: str) -> None:
        """Count one request of an authenticated owner; a 429 Refusal with Retry-After past its rate."""
        wait = self._take(owner)
        if wait:
            raise Refusal(429, f"owner {owner} is over its limit of {self.limits.requests_per_minute} requests per minute", wait)

    @contextmanager
    def opening(self, owner: str) -> Iterator[None]:
        """Hold a place among the owner's sessions while one opens (before its key is read); a 429 Refusal at its cap."""
        with self._lock:
            if self._sessions_of(owner) + self._opening[owner] >= self.limits.sessions:
                raise self.full(owner)
            self._opening[owner] += 1
        try:
            yield
        finally:
            with self._lock:
                self._opening[owner] -= 1

    def full(self, owner: str) -> Refusal:
        return Refusal(429, f"owner {owner} is at its limit of {self.limits.sessions} concurrent sessions; "
                            "close one or let it expire", self.SESSION_FULL_RETRY_S)

    def describe(self) -> str:
        return (f"admission by API key ({len(self.keys)} owners; each at most {self.limits.sessions} sessions and "
                f"{self.limits.requests_per_minute} requests per minute)")


OPEN_ADMISSION = ("admission open (no --api-keys): anyone who reaches this address can open sessions; "
                  "fine on loopback or a private dev network only")
