"""The node's long-lived worker: data, ledger and torch loaded once, next to the SuperNode.

Flower starts a fresh ClientApp process for every message; importing torch and Opacus,
loading the site's images and computing their scattering features in it would cost
seconds per round. So ``privmed node`` keeps one worker process holding a
:class:`SiteNode`, and the ClientApp (``flower_apps``, which imports neither torch nor
privmed's training code) hands each round to it over a local Unix socket,
authenticated with a per-node secret (``multiprocessing.connection``'s HMAC
challenge; the secret file is readable by the node's user only).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from privmed.errors import NetworkError


def write_secret(path: Path) -> bytes:
    """A fresh 32-byte secret in ``path`` (0600). Written to a new file that then replaces
    ``path``: opening an existing file, or a link someone planted there, would keep its
    owner and permissions (or write through the link)."""
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(key)
    os.replace(tmp, path)  # replaces a planted link itself, never its target
    return key


def ask_worker(address: str, key_file: str, request: dict[str, Any],
               timeout: float = 3600.0) -> dict[str, Any]:
    """Send one round to the worker and wait for its reply (used by the ClientApp)."""
    try:
        key = Path(key_file).read_bytes()
        with Client(address, family="AF_UNIX", authkey=key) as conn:
            conn.send(request)
            if not conn.poll(timeout):
                raise NetworkError(f"The node's worker gave no answer within {timeout:.0f} s.")
            return conn.recv()
    except (OSError, EOFError) as exc:
        raise NetworkError(f"The node's worker at {address} cannot be reached "
                           f"({type(exc).__name__}); is 'privmed node' running?") from None


class NodeWorker:
    """Serves rounds from the ClientApp, one at a time, until :meth:`close`."""

    def __init__(self, address: Path, key: bytes,
                 handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        address.unlink(missing_ok=True)
        self.address = address
        # multiprocessing's authkey: every connection must answer a fresh random challenge
        # with an HMAC under the node's secret, and the worker answers one in turn, before
        # any message is read; a recorded exchange does not answer the next challenge.
        self.listener = Listener(str(address), family="AF_UNIX", authkey=key, backlog=16)
        os.chmod(address, 0o600)  # its folder is already 0700 (tempfile.mkdtemp)
        self.handle = handle
        self._closed = threading.Event()

    def serve_forever(self, on_error: Callable[[str], None] = print) -> None:
        while not self._closed.is_set():
            try:
                conn = self.listener.accept()
            except Exception as exc:  # a client that failed the challenge, or went away
                if self._closed.is_set():
                    return
                on_error(f"Rejected a connection to the worker: {type(exc).__name__}.")
                continue
            with conn:
                try:
                    request = conn.recv()
                    conn.send(self.handle(request))
                except (EOFError, OSError):
                    continue
                except Exception as exc:  # one bad round must not stop the node
                    on_error(f"Round failed: {exc}")
                    conn.send({"meta": json.dumps({"status": "error", "reason": str(exc)}),
                               "arrays": None})

    def serve_in_thread(self, on_error: Callable[[str], None] = print) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(on_error,), daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        self.address.unlink(missing_ok=True)
