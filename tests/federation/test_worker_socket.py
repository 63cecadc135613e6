"""Attacks on a running node's worker socket: a real ``privmed node`` (admitted by a
coordinator on loopback) and other processes that try to make its worker run a round."""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path

import pytest
from procs import start_privmed, stop, wait_until

pytest.importorskip("flwr")

BAD_REQUEST = {"kind": "train", "job": "{}", "round": 1, "payload": "", "arrays": None}


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(task.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(task.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _worker_socket(node_pid: int) -> str:
    """The socket path the node handed its SuperNode (--node-config worker=...)."""
    for pid in _children(node_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        found = re.search(r'worker="([^"]+)"', cmdline)
        if found:
            return found.group(1)
    raise AssertionError("no SuperNode with a worker socket under the node")


class Relay:
    """A process in the middle: forwards one connection to the worker and records what
    the client sent (what an eavesdropper on the socket would capture)."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target, self.sent = path, target, bytearray()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        threading.Thread(target=self._run, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        while data := src.recv(65536):
            if record:
                self.sent += data
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    def _run(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(self.target)
        back = threading.Thread(target=self._pump, args=(upstream, client, False))
        back.start()
        self._pump(client, upstream, True)
        back.join()


def _frames(data: bytes) -> list[bytes]:
    """multiprocessing.connection's framing: a 4-byte big-endian length, then the bytes."""
    frames = []
    while data:
        n = int.from_bytes(data[:4], "big")
        frames.append(data[4:4 + n])
        data = data[4 + n:]
    return frames


def _raw_exchange(address: str, payload: bytes) -> bytes:
    """Send ``payload`` on a fresh connection; everything the worker answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while data := s.recv(65536):
                got += data
        except (TimeoutError, ConnectionResetError):
            pass
    return got


@pytest.fixture
def running_node(tmp_path):
    """A coordinator on loopback and one admitted node whose home had a secret planted."""
    from privmed.federation.runtime.deploy import Coordinator
    from privmed.processes import ProcessGroup

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    leak = tmp_path / "attacker-readable"
    leak.write_bytes(b"")
    os.chmod(leak, 0o644)
    (home / "worker.key").symlink_to(leak)  # planted: the secret must not land in it
    log = tmp_path / "node.log"
    with ProcessGroup() as group:
        coord = Coordinator(group, tmp_path / "coord")
        node = start_privmed("node", "--data", "synthetic", "--superlink", coord.address,
                             "--insecure", "--home", str(home), "--connect-timeout", "120",
                             log=log)
        try:
            wait_until(lambda: "is connected" in log.read_text() or node.poll() is not None,
                       180, "the node to be admitted")
            assert node.poll() is None, log.read_text()
            yield {"node": node, "log": log, "home": home, "leak": leak,
                   "address": _worker_socket(node.pid), "tmp": tmp_path}
        finally:
            stop(node)


def _handled(log: Path) -> int:
    """Requests the worker's handler ran (a malformed round is answered with an error, and
    the node says so)."""
    return log.read_text().count("Round 1: error")


def test_worker_socket_refuses_other_processes_and_replays(running_node):
    address, log, home = running_node["address"], running_node["log"], running_node["home"]
    key = (home / "worker.key").read_bytes()

    # Secrets at rest: the planted link was replaced, not written through.
    assert running_node["leak"].read_bytes() == b""
    assert not (home / "worker.key").is_symlink()
    assert stat.S_IMODE((home / "worker.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(address).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(Path(address).parent).st_mode) == 0o700

    # The genuine path, recorded by a process in the middle: the handler runs once.
    from privmed.federation.node.worker import ask_worker

    relay = Relay(running_node["tmp"] / "relay.sock", address)
    reply = ask_worker(str(relay.path), str(home / "worker.key"), BAD_REQUEST, timeout=60)
    assert '"error"' in reply["meta"]
    wait_until(lambda: _handled(log) == 1, 10, "the handler to log the bad round")
    frames = _frames(bytes(relay.sent))
    # our HMAC of its challenge, our own challenge, our welcome of its HMAC, the request
    assert len(frames) == 4 and frames[1].startswith(b"#CHALLENGE#")

    # 1. No secret: the request goes where the answer to the challenge belongs.
    with Client(address, family="AF_UNIX") as conn:
        conn.send(BAD_REQUEST)
        with pytest.raises(Exception):  # noqa: B017 - whatever it gets, it is no reply
            assert "meta" not in conn.recv()
    # 2. A forged HMAC (a guessed secret).
    with pytest.raises(AuthenticationError):
        Client(address, family="AF_UNIX", authkey=os.urandom(32))
    # 3. A stale HMAC: the digest that answered the earlier challenge, then the request.
    stale = b"".join(len(f).to_bytes(4, "big") + f for f in (frames[0], frames[3]))
    assert b"#FAILURE#" in _raw_exchange(address, stale)
    # 4. The whole recorded exchange, replayed verbatim on a new connection.
    assert b"#FAILURE#" in _raw_exchange(address, bytes(relay.sent))

    # The worker has logged its verdict on all four before the handler is checked.
    wait_until(lambda: log.read_text().count("Rejected a connection to the worker") >= 4, 30,
               "the worker to log the four refused connections")
    assert _handled(log) == 1, "a refused connection reached the handler"
    # ...and the worker still serves the genuine ClientApp afterwards.
    assert '"error"' in ask_worker(address, str(home / "worker.key"), BAD_REQUEST,
                                   timeout=60)["meta"]
    assert key == (home / "worker.key").read_bytes()
