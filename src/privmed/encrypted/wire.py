"""The bytes on the wire: a magic line, a JSON header naming each part and its length,
then the parts (serialised SEAL objects). Nothing is unpickled; every length is checked."""

from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = b"PRIVMED-HE/1\n"
MAX_HEADER = 1 << 20


class WireError(ValueError):
    """A message is malformed (one sentence, answered with HTTP 400)."""


def pack(kind: str, parts: list[tuple[str, bytes]], **meta: Any) -> bytes:
    header = json.dumps({"kind": kind, "meta": meta,
                         "parts": [[name, len(data)] for name, data in parts]}).encode()
    return b"".join([MAGIC, struct.pack(">I", len(header)), header, *(d for _, d in parts)])


def unpack(data: bytes, kind: str) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """Split a message of ``kind``; returns (meta, [(name, bytes), ...])."""
    if not data.startswith(MAGIC):
        raise WireError(f"The body is not a privmed encrypted-inference message (expected a "
                        f"'{kind}' message starting with {MAGIC.strip().decode()}).")
    offset = len(MAGIC)
    if len(data) < offset + 4:
        raise WireError("The message is truncated before its header.")
    (size,) = struct.unpack(">I", data[offset:offset + 4])
    offset += 4
    if size > MAX_HEADER or offset + size > len(data):
        raise WireError("The message header is truncated or too large.")
    try:
        header = json.loads(data[offset:offset + size])
        parts_spec = [(str(n), int(length)) for n, length in header["parts"]]
        meta = dict(header.get("meta") or {})
        got_kind = header["kind"]
    except (ValueError, KeyError, TypeError):
        raise WireError("The message header is not valid JSON with kind, meta and parts.") \
            from None
    if got_kind != kind:
        raise WireError(f"Expected a '{kind}' message, got '{got_kind}'.")
    offset += size
    if any(length < 0 for _, length in parts_spec) or \
            offset + sum(length for _, length in parts_spec) != len(data):
        raise WireError("The message's part lengths do not add up to its size (truncated?).")
    parts = []
    for name, length in parts_spec:
        parts.append((name, data[offset:offset + length]))
        offset += length
    return meta, parts
