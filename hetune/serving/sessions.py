"""Bearer-token sessions with a cap and an idle TTL, shared by the core worker and the SFPrompt body server.

Both servers hand each client a random session id and token, refuse new sessions past a
cap, drop idle ones, and check tokens in constant time; only what a session holds differs
(a GLWE compression key, pending activations). Logs name a session by the first 8
characters of its id: never its token or contents.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Generic, Protocol, TypeVar


class _HasToken(Protocol):
    token: str
    last_used: float


S = TypeVar("S", bound=_HasToken)


class SessionLimitError(Exception):
    """The store is at its cap, or ``owner`` at its own; the server answers 429 so the client retries later."""

    def __init__(self, owner: str | None = None):
        super().__init__(owner)
        self.owner = owner


class SessionStore(Generic[S]):
    """Sessions of any type with ``token`` and ``last_used`` (monotonic seconds), safe across threads.

    ``on_drop`` sees each session as it is closed or expires (under the store's lock), so an
    owner can keep totals of sessions that are gone.
    """

    def __init__(self, max_sessions: int, ttl_s: float, log: logging.Logger,
                 on_drop: Callable[[S], None] | None = None):
        self.max_sessions, self.ttl_s, self._log, self._on_drop = max_sessions, ttl_s, log, on_drop
        self._sessions: dict[str, S] = {}
        self._reserved = 0  # places held by opens still reading their key
        self._lock = threading.Lock()

    def _drop(self, sid: str) -> None:
        session = self._sessions.pop(sid)
        if self._on_drop is not None:
            self._on_drop(session)

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for sid in [s for s, v in self._sessions.items() if now - v.last_used > self.ttl_s]:
                self._drop(sid)
                self._log.info("session %s expired", sid[:8])

    @contextmanager
    def reserve(self) -> Iterator[None]:
        """Hold a place under the cap while a new session's key is read, so the cap is checked before
        any large read and concurrent opens cannot all read past it. Raises SessionLimitError at the cap."""
        self.expire()
        with self._lock:
            if len(self._sessions) + self._reserved >= self.max_sessions:
                raise SessionLimitError
            self._reserved += 1
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= 1

    def create(self, make: Callable[[str], S], reserved: bool = False) -> tuple[str, str]:
        """A new (session id, token); ``make(token)`` builds the session. Raises SessionLimitError at the cap.

        ``reserved``: the caller holds a place from :meth:`reserve`."""
        self.expire()
        with self._lock:
            if len(self._sessions) + self._reserved - reserved >= self.max_sessions:
                raise SessionLimitError
            sid, token = secrets.token_hex(16), secrets.token_urlsafe(32)
            self._sessions[sid] = make(token)
        return sid, token

    def get(self, sid: str, token: str | None) -> S | None | bool:
        """The session; None if unknown; False if the token is wrong."""
        self.expire()
        session = self._sessions.get(sid)
        if session is None:
            return None
        # as bytes: compare_digest refuses str with non-ASCII characters, which any client can put in a header
        if token is None or not hmac.compare_digest(session.token.encode(), token.encode()):
            return False
        session.last_used = time.monotonic()
        return session

    def close(self, sid: str) -> None:
        with self._lock:
            if sid in self._sessions:
                self._drop(sid)

    def values(self) -> list[S]:
        with self._lock:
            return list(self._sessions.values())

    def owned_by(self, owner: str) -> int:
        """Live sessions opened by ``owner`` (sessions with an ``owner`` attribute)."""
        self.expire()
        return sum(getattr(s, "owner", None) == owner for s in self.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: str) -> bool:
        """Whether the session exists (and has not expired)."""
        self.expire()
        return sid in self._sessions
