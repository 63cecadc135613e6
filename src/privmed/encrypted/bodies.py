"""Request bodies on the server: checked, budgeted across requests, spooled to disk.

A body must be ``application/octet-stream`` with a ``Content-Length``. Its length is
reserved from one byte budget shared by every request in flight before a byte is read
(503 when the budget is spent), and the body goes to a temporary file rather than
memory, so concurrent uploads cost disk, not the server's RAM.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import BinaryIO

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

OCTET = "application/octet-stream"
SPOOL_IN_MEMORY = 1 << 20  # bodies beyond this go to a temporary file


def require_octet_stream(request: Request) -> None:
    """FastAPI dependency: 415 unless the body is declared ``application/octet-stream``.

    Hand-written: FastAPI checks the type only of bodies it parses itself (JSON, forms).
    Requiring it also stops cross-site pages: browsers may send ``text/plain`` to any
    site without asking, but ``application/octet-stream`` only after a CORS preflight,
    which this server never grants."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != OCTET:
        raise HTTPException(415, f"Send the body as {OCTET} (a privmed message).")


class ByteBudget:
    """Bytes of request bodies accepted and not yet released, across all requests."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        with self._lock:
            if self.used + size > self.limit:
                raise HTTPException(503, "The server is receiving as much data as it allows "
                                         "at once; retry in a moment.",
                                    headers={"Retry-After": "10"})
            self.used += size
        try:
            yield
        finally:
            with self._lock:
                self.used -= size


@asynccontextmanager
async def spooled_body(request: Request, limit: int, what: str, budget: ByteBudget,
                       timeout_s: float) -> AsyncIterator[tuple[BinaryIO, int]]:
    """The body in a temporary file (position 0) and its size; released on exit.

    Hand-written: Starlette spools only multipart form files; these bodies are raw."""
    declared = request.headers.get("content-length")
    if declared is None:
        raise HTTPException(411, f"Send the {what} with a Content-Length header.")
    if not declared.isdigit():  # uvicorn already refuses such requests; kept for the app
        raise HTTPException(400, "The Content-Length header is not a whole number.")
    size = int(declared)
    if size > limit:
        raise HTTPException(413, f"The {what} is {size:,} bytes; this server accepts at "
                                 f"most {limit:,}.")
    with budget.reserve(size), tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
        received = 0
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > size:
                        raise HTTPException(400, f"The {what} is longer than its "
                                                 "Content-Length.")
                    spool.write(chunk)
        except TimeoutError:
            raise HTTPException(408, f"The {what} did not arrive within {timeout_s:g} s."
                                ) from None
        except ClientDisconnect:  # nobody to answer; without this, a logged traceback
            raise HTTPException(400, f"The client left before its {what} arrived.") from None
        if received != size:
            raise HTTPException(400, f"The {what} is shorter than its Content-Length.")
        spool.seek(0)
        yield spool, size
