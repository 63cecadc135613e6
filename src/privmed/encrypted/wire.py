"""The bytes on the wire: a magic line, a JSON header naming each part and its length,
then the parts (serialised SEAL objects). Nothing is unpickled; every length is checked.

The server reads a message from a file (the spooled request body, ``read_header`` and
``read_part``: one part in memory at a time); the client unpacks small replies in memory.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

MAGIC = b"PRIVMED-HE/1\n"
MAX_HEADER = 1 << 20


class WireError(ValueError):
    """A message is malformed (one sentence, answered with HTTP 400)."""


class _Header(BaseModel):
    # pydantic's JSON parser bounds nesting depth and rejects 1e400 or 1.0 as a length,
    # which json.loads + int() turned into RecursionError / OverflowError (HTTP 500).
    model_config = ConfigDict(strict=True, extra="ignore")
    kind: StrictStr
    meta: dict[str, Any] = Field(default_factory=dict)
    parts: list[tuple[StrictStr, Annotated[StrictInt, Field(ge=0)]]]


@dataclass(frozen=True)
class PartRef:
    """Where one part lies in a message."""

    name: str
    offset: int
    length: int


def pack(kind: str, parts: list[tuple[str, bytes]], **meta: Any) -> bytes:
    header = _Header(kind=kind, meta=meta,
                     parts=[(name, len(data)) for name, data in parts]).model_dump_json()
    return b"".join([MAGIC, struct.pack(">I", len(header)), header.encode(),
                     *(d for _, d in parts)])


def read_header(fp: BinaryIO, size: int, kind: str) -> tuple[dict[str, Any], list[PartRef]]:
    """Check the message of ``size`` bytes in ``fp`` (from its start) is a ``kind`` message
    whose part lengths add up to ``size``; returns (meta, where each part lies)."""
    fp.seek(0)
    if fp.read(len(MAGIC)) != MAGIC:
        raise WireError(f"The body is not a privmed encrypted-inference message (expected a "
                        f"'{kind}' message starting with {MAGIC.strip().decode()}).")
    length_bytes = fp.read(4)
    if len(length_bytes) < 4:
        raise WireError("The message is truncated before its header.")
    (header_size,) = struct.unpack(">I", length_bytes)
    offset = len(MAGIC) + 4 + header_size
    if header_size > MAX_HEADER or offset > size:
        raise WireError("The message header is truncated or too large.")
    try:
        header = _Header.model_validate_json(fp.read(header_size))
    except ValidationError:
        raise WireError("The message header is not valid JSON with a kind, meta and parts "
                        "given as [name, length] with whole non-negative lengths.") from None
    if header.kind != kind:
        raise WireError(f"Expected a '{kind}' message, got '{header.kind[:40]}'.")
    refs = []
    for name, length in header.parts:
        refs.append(PartRef(name, offset, length))
        offset += length
    if offset != size:
        raise WireError("The message's part lengths do not add up to its size (truncated?).")
    return header.meta, refs


def read_part(fp: BinaryIO, ref: PartRef) -> bytes:
    fp.seek(ref.offset)
    return fp.read(ref.length)


def unpack(data: bytes, kind: str) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """Split a message of ``kind``; returns (meta, [(name, bytes), ...])."""
    meta, refs = read_header(io.BytesIO(data), len(data), kind)
    return meta, [(r.name, data[r.offset:r.offset + r.length]) for r in refs]
