"""Starting, waiting for and stopping the processes privmed runs for the user.

One implementation for every long-lived child: Flower's SuperLink, SuperNodes and node
workers (``federation.runtime``) and the encrypted-inference server (``encrypted.server``).
Every child gets SIGTERM when privmed dies, even by SIGKILL (Linux), and by default starts
in a session of its own, so that stopping it also stops the children it spawned (Flower's
SuperExec and its ServerApp/ClientApp processes). :class:`ProcessGroup` stops everything it
started on exit, on an exception and on Ctrl-C. Ports are chosen free on loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from privmed.errors import NetworkError


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux; nothing elsewhere). Called
    in a child before exec, and by Flower's app processes, which Flower starts from a
    SuperExec but does not stop when it dies; one whose parent is already gone stops."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before we asked
            os.kill(os.getpid(), signal.SIGTERM)


def _die_with_parent_before_exec() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start(cmd: Sequence[str], env: dict[str, str], log: IO[Any],
          new_session: bool = True) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``log``; it dies with us. ``new_session=False``
    keeps it in our process group, so whoever kills our group kills it too."""
    proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=new_session,
                            preexec_fn=_die_with_parent_before_exec)
    proc.own_group = new_session  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Stop ``proc`` (its whole session when it has one), SIGKILL after ``wait`` seconds,
    then every process it spawned that started a session of its own."""
    # Flower's SuperExec and its Server/ClientApps start sessions of their own: find them
    # first, they are signalled after the process itself.
    found = descendants(proc.pid)
    try:
        _stop_one(proc, sig, wait)
    finally:
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)


def _stop_one(proc: subprocess.Popen, sig: int, wait: float) -> None:
    if proc.poll() is not None:
        return
    own_group = getattr(proc, "own_group", True)
    try:
        if own_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        if own_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


class ProcessGroup:
    """Processes started for one command; all stopped when the ``with`` block ends."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, IO[Any]]] = []

    def __enter__(self) -> ProcessGroup:
        self._old = signal.getsignal(signal.SIGTERM)
        # A SIGTERM to privmed becomes KeyboardInterrupt, so the cleanup below runs.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        signal.signal(signal.SIGTERM, self._old)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str], log: Path,
              new_session: bool = True) -> subprocess.Popen:
        """Start ``cmd`` with its output appended to ``log`` (see :func:`start`)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")  # noqa: SIM115 - closed in stop_all()
        proc = start(cmd, env, fh, new_session)
        self.procs.append((name, proc, fh))
        return proc

    stop = staticmethod(stop)

    def stop_all(self) -> None:
        for _, proc, fh in reversed(self.procs):
            stop(proc)
            fh.close()
        self.procs.clear()


def connect_host(host: str) -> str:
    """Where a process on this machine reaches a server bound to ``host``: loopback for
    the wildcard addresses, else the address itself (what Flower does for its SuperExec)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_until(predicate: Callable[[], bool], timeout: float, message: str,
               poll: float = 0.5) -> None:
    """Until ``predicate()`` holds; NetworkError(``message``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise NetworkError(message)
        time.sleep(poll)


def wait_for_port(host: str, port: int, proc: subprocess.Popen, what: str, log: Path,
                  timeout: float = 60.0, say: Any = None,
                  ready: Callable[[str, int], bool] | None = None) -> None:
    """Until ``proc`` accepts connections on ``host:port`` (the address it was told to
    bind, or loopback for a wildcard one) and ``ready(address, port)`` holds, if given
    (e.g. a health check). NetworkError when it exits first or after ``timeout``."""
    address = connect_host(host)
    deadline = time.monotonic() + timeout
    told = time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NetworkError(f"The {what} exited at start-up (code {proc.returncode}); "
                               f"see {log}.")
        try:
            socket.create_connection((address, port), 0.5).close()
            if ready is None or ready(address, port):
                return
        except OSError:
            pass
        if say is not None and time.monotonic() - told > 15:
            say(f"Still waiting for the {what} to open {host_port(address, port)}...")
            told = time.monotonic()
        time.sleep(0.1)
    raise NetworkError(f"The {what} did not open {host_port(address, port)} within "
                       f"{timeout:.0f} s; see {log}.")
