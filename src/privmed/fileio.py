"""Files only their owner may read (mode 0600): model weights, checkpoints, compiled
models and the de-identification audit log.

Weights memorise training images (the audits in ``privmed audit`` measure how much) and
the audit log maps original file names, which often carry names or MRNs, to outputs, so
none of them should be readable by every account on a shared machine. Writes go to a
new temporary file created 0600 in the target's folder and then replace the target, so
readers never see half a file and an existing 0644 file does not keep its mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

PRIVATE_MODE = 0o600


@contextlib.contextmanager
def _private_tmp(path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Create or replace ``path`` (mode 0600) with what ``write(fh)`` writes to a binary
    file handle, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _private_tmp(path) as (fh, _):
        write(fh)
    return path


def write_private_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """``path.write_bytes(data)``, but 0600 and atomic."""
    return write_private(path, lambda fh: fh.write(data))


def save_private_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, but 0600 and atomic."""
    import torch  # lazy: the de-identification commands never need it

    return write_private(path, lambda fh: torch.save(obj, fh))


def open_private_text(path: str | os.PathLike[str]) -> IO[str]:
    """Open ``path`` for writing text (truncating it), readable by its owner only, also
    when it already existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "w", newline="", encoding="utf-8")
