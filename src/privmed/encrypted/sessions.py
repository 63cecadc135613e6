"""The server's sessions: one client's evaluation keys, a bearer token, an image budget.

A session is named by an id (in the URL) and used with a separate bearer token (the
``Authorization`` header), so that an id seen in a proxy's access log grants nothing.
Limits apply per token: the images the server computes (not the number a client
declares), one request at a time, and an expiry that only a successful prediction
extends, so malformed requests cannot keep a session (one of the few) alive.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import HTTPException

from privmed.encrypted.evaluate import EvaluationKeys


@dataclass
class Session:
    keys: EvaluationKeys
    token: str
    expires: float
    log_tag: str  # random: correlates log lines without logging the id or the token
    images: int = 0
    busy: bool = False


@dataclass
class SessionStore:
    """Sessions by id, with expiry, a count limit and a per-token image budget."""

    ttl_s: float
    max_sessions: int
    max_images: int
    _sessions: dict[str, Session] = field(default_factory=dict)
    _opening: int = 0  # sessions whose keys are still being uploaded or loaded
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _purge(self, now: float) -> None:
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            del self._sessions[sid]

    @contextmanager
    def opening(self) -> Iterator[None]:
        """Hold a place for a session being opened, so that no key upload is read when
        the server is full."""
        with self._lock:
            self._purge(time.monotonic())
            if len(self._sessions) + self._opening >= self.max_sessions:
                raise HTTPException(503, "The server holds its maximum number of sessions; "
                                         "retry after one expires or is closed.",
                                    headers={"Retry-After": "60"})
            self._opening += 1
        try:
            yield
        finally:
            with self._lock:
                self._opening -= 1

    def add(self, keys: EvaluationKeys) -> tuple[str, str]:
        """Store ``keys`` (inside ``opening``); returns (session id, bearer token)."""
        sid = secrets.token_urlsafe(16)
        token = secrets.token_urlsafe(32)
        session = Session(keys, token, time.monotonic() + self.ttl_s, secrets.token_hex(4))
        with self._lock:
            self._sessions[sid] = session
        return sid, token

    def authorise(self, sid: str, token: str | None) -> Session:
        """The session ``sid`` if ``token`` is its bearer token (401, 403 or 404 if not)."""
        if not token:
            raise HTTPException(401, "This request needs the session's bearer token in an "
                                     "'Authorization: Bearer ...' header.",
                                headers={"WWW-Authenticate": "Bearer"})
        with self._lock:
            self._purge(time.monotonic())
            session = self._sessions.get(sid)
        if session is None:
            raise HTTPException(404, "Unknown or expired session; upload the evaluation "
                                     "context again.")
        # bytes: compare_digest refuses non-ASCII str, and headers may hold any latin-1
        if not hmac.compare_digest(token.encode(), session.token.encode()):
            raise HTTPException(403, "The bearer token does not belong to this session.")
        return session

    @contextmanager
    def request(self, session: Session, cost: int) -> Iterator[None]:
        """One request at a time per token, refused (429) if ``cost`` images would exceed
        the session's budget; the images are charged by ``charge`` once computing starts."""
        with self._lock:
            if session.busy:
                raise HTTPException(429, "This session already has a request in progress; "
                                         "wait for its answer.")
            if session.images + cost > self.max_images:
                raise HTTPException(429, f"This session has used {session.images:,} of its "
                                         f"{self.max_images:,} images and this request "
                                         f"computes {cost:,}; open a new session later.")
            session.busy = True
        try:
            yield
        finally:
            with self._lock:
                session.busy = False

    def charge(self, session: Session, cost: int) -> None:
        with self._lock:
            session.images += cost

    def touch(self, session: Session) -> None:
        """Extend the session's life: called after a successful prediction only."""
        with self._lock:
            session.expires = time.monotonic() + self.ttl_s

    def remove(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def __len__(self) -> int:
        return len(self._sessions)
