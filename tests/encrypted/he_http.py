"""Raw HTTP against a real ``privmed serve`` process: what an attacker (or a careful
client) sends, byte for byte, without going through ``EncryptedClient``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import httpx
import numpy as np
from procs import starts_processes, wait_until

from privmed.encrypted.ckks import CKKSParams, SecretKeys
from privmed.encrypted.layout import SingleLayout, pack_single
from privmed.encrypted.server import start_server_process, stop_process
from privmed.encrypted.wire import pack

OCTET = {"Content-Type": "application/octet-stream"}


@dataclass
class RawSession:
    url: str
    sid: str
    token: str
    keys: SecretKeys

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/sessions/{self.sid}/predict"

    def predict(self, body: bytes, encoding: str = "single", headers: dict | None = None,
                **params: object) -> httpx.Response:
        return httpx.post(self.predict_url, params={"encoding": encoding, **params},
                          content=body, headers={**OCTET, **self.auth, **(headers or {})},
                          timeout=300)

    def single_body(self, layout: SingleLayout, image: np.ndarray) -> bytes:
        """A valid single-encoding request for ``image``."""
        return pack("ciphertexts", [("ct0", self.keys.encrypt(pack_single(layout, image)))])


def context_body(keys: SecretKeys, rotations: bool = True) -> bytes:
    return pack("context", list(keys.evaluation_keys(rotations=rotations).items()))


def open_session(url: str, params: CKKSParams, rotations: bool = True) -> RawSession:
    keys = SecretKeys(params)
    reply = httpx.post(f"{url}/v1/sessions", content=context_body(keys, rotations),
                       headers=OCTET, timeout=120)
    assert reply.status_code == 201, reply.text
    opened = reply.json()
    return RawSession(url, opened["session"], opened["token"], keys)


def is_one_sentence(reply: httpx.Response) -> bool:
    """A 4xx whose JSON detail is one sentence (no traceback, no list of errors)."""
    try:
        detail = reply.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return False
    return (400 <= reply.status_code < 500 and isinstance(detail, str)
            and detail.endswith(".") and ". " not in detail.rstrip(".")
            and "Traceback" not in detail)


@starts_processes
@contextmanager
def serving(artefact: Path, log_dir: Path, *args: str) -> Iterator[tuple[Popen, str]]:
    """A dedicated ``privmed serve`` process with extra CLI options."""
    proc, url = start_server_process(artefact, log_dir / "serve.log", *args)
    try:
        yield proc, url
    finally:
        stop_process(proc)


def proc_status_kib(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def predictions_logged(log_path: Path, expected: int | None = None) -> int:
    """Single-image predictions a ``privmed serve`` log records so far; with ``expected``,
    once it records that many (the server logs a prediction just after its reply)."""
    if expected is not None:
        wait_until(lambda: _count(log_path) >= expected, 30, f"{expected} logged predictions")
        return _count(log_path)
    # Deliberate: a count that must not grow (the hospital computed nothing) can only be
    # taken after giving a line that should not come, or the last one that should, its time.
    time.sleep(0.3)
    return _count(log_path)


def _count(log_path: Path) -> int:
    return log_path.read_text(errors="replace").count("image(s), single encoding")
