"""Attacks on the coordinator's port and on the federation's TLS, against real processes:
a coordinator (SuperLink on loopback behind the Fleet-only gateway, TLS and SuperNode
authentication) and ``privmed node`` / ``flwr`` processes playing the attacker."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flower_procs import ENV, privmed, start
from procs import wait_until

pytest.importorskip("flwr")

def _cert(folder: Path, hosts: list[str], *, ca_from: Path, days: tuple[int, int]) -> Path:
    """server.pem/.key for ``hosts`` signed by ``ca_from``'s CA, valid from days[0] to
    days[1] relative to now (negative: in the past)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from privmed.federation.runtime.certs import _san

    ca = x509.load_pem_x509_certificate((ca_from / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_from / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days[0]))
            .not_valid_after(now + dt.timedelta(days=days[1]))
            .add_extension(_san(hosts), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes((ca_from / "ca.crt").read_bytes())
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return folder


def _expired_ca(path: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A TLS coordinator for 127.0.0.1 only, with site-1's key registered."""
    from privmed.federation.runtime.certs import provision
    from privmed.federation.runtime.deploy import Coordinator
    from privmed.processes import ProcessGroup

    tmp = tmp_path_factory.mktemp("attacks")
    certs = provision(tmp / "certs", hosts=["127.0.0.1"], nodes=["site-1"])
    with ProcessGroup() as group:
        coord = Coordinator(group, tmp / "coord", certs=certs, public=True)
        yield {"coord": coord, "group": group, "certs": certs, "tmp": tmp}


def _raw(port: int, ca: Path, request: bytes) -> bytes:
    """One HTTP request sent byte for byte over TLS (no client library normalises it)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), 10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(request)
        got = b""
        while data := s.recv(65536):
            got += data
            if b"\r\n\r\n" in got:
                break
    return got


def test_control_api_is_not_reachable_through_the_nodes_port(coordinator):
    """Flower's SuperLink serves its unauthenticated Control API on the Fleet port:
    anyone reaching it could register a key of their own or submit an app. Through the
    coordinator's public port every such call is refused."""
    from privmed.federation.runtime.certs import add_node_key
    from privmed.federation.runtime.launcher import FlowerCli, write_app

    coord, certs, tmp = coordinator["coord"], coordinator["certs"], coordinator["tmp"]
    before = coord.cli.nodes()
    attacker = FlowerCli(tmp / "attacker", coord.address, certs / "ca.crt")
    rogue = add_node_key(tmp / "rogue", "rogue").with_suffix(".pub")
    from privmed.errors import NetworkError

    with pytest.raises(NetworkError, match="Not Found"):
        attacker.register(rogue)  # flwr supernode register
    assert attacker.nodes() == []  # flwr supernode list: refused, lists nothing
    with pytest.raises(NetworkError):
        attacker.submit(write_app(tmp / "evil-app"), {"job-file": "/nonexistent"})  # flwr run
    for line in (b"POST /v1/control/list-nodes", b"POST /v1/control/start-run",
                 b"POST /v1/fleet/../control/register-node", b"POST /v1/fleet/%2e%2e/control/x",
                 b"GET /v1/fleet/pull-messages", b"POST /v1/fleet/pull-messages?x=1",
                 b"GET /docs", b"GET /openapi.json"):
        head = _raw(coord.port, certs / "ca.crt",
                    line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404"), (line, head[:200])
    # The coordinator's own Control API (loopback) saw none of it.
    assert coord.cli.nodes() == before and len(before) == 1
    log = (tmp / "coord" / "gateway.log").read_text()
    assert "refused POST '/v1/control/register-node'" in log


def test_node_retries_refusals_that_pass(coordinator, tmp_path):
    """Flower's SuperNode exits at once on HTTP 412 ("Failed to activate SuperNode").
    privmed's node retries with backoff: it is admitted once the coordinator registers
    its key, and, killed and restarted at once, once Flower stops counting its earlier
    connection as online."""
    from privmed.federation.runtime.certs import add_node_key

    coord, certs = coordinator["coord"], coordinator["certs"]
    key = add_node_key(tmp_path / "late", "late")

    def start_node(log: Path) -> subprocess.Popen:
        return start("node", "--data", "synthetic", "--superlink", coord.address, "--home",
                     str(tmp_path / "h"), "--root-cert", str(certs / "ca.crt"), "--auth-key",
                     str(key), "--connect-timeout", "240", log=log)

    def admitted(node: subprocess.Popen, log: Path) -> None:
        wait_until(lambda: "does not accept this node's key yet" in log.read_text()
                   or node.poll() is not None, 120, "a refusal")
        assert node.poll() is None, log.read_text()
        wait_until(lambda: "is connected" in log.read_text() or node.poll() is not None, 180,
                   "the node to be admitted")
        assert node.poll() is None, log.read_text()

    first = start_node(tmp_path / "first.log")
    node_id = None
    try:
        wait_until(lambda: "does not accept this node's key yet" in
                   (tmp_path / "first.log").read_text() or first.poll() is not None, 120,
                   "the first refusal")
        node_id = coord.cli.register(key.with_suffix(".pub"))  # the coordinator adds it late
        admitted(first, tmp_path / "first.log")
        os.killpg(first.pid, 9)  # the hospital's machine crashes...
        first.wait(timeout=30)
        again = start_node(tmp_path / "again.log")  # ...and the node is restarted at once
        try:
            admitted(again, tmp_path / "again.log")
            status = {int(n["node-id"]): n["status"] for n in coord.cli.nodes()}
            assert status[node_id] == "online"
        finally:
            os.killpg(again.pid, 15)
            again.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 15)
            first.wait(timeout=30)


def test_foreign_expired_and_misnamed_certificates_are_refused(coordinator, tmp_path):
    from privmed.federation.runtime.certs import provision
    from privmed.federation.runtime.launcher import gateway_command
    from privmed.processes import free_port, wait_for_port

    coord, certs, group = coordinator["coord"], coordinator["certs"], coordinator["group"]
    foreign = provision(tmp_path / "foreign", hosts=["127.0.0.1"], nodes=[])
    expired_ca = _cert(tmp_path / "old", ["127.0.0.1"], ca_from=certs, days=(-10, -1))
    # a gateway presenting an expired certificate of the right CA
    port = free_port()
    gw = group.start("expired-gateway", gateway_command("127.0.0.1", port, "https://127.0.0.1:1",
                                                        None, expired_ca),
                     dict(os.environ), tmp_path / "gw.log")
    wait_for_port("127.0.0.1", port, gw, "gateway", tmp_path / "gw.log")
    key = str(certs / "nodes" / "site-1.key")
    cases = {  # name: (superlink, root cert, expected words)
        "foreign CA": (coord.address, foreign / "ca.crt", "certificate was rejected"),
        "expired server certificate": (f"127.0.0.1:{port}", certs / "ca.crt",
                                       "certificate has expired"),
        "name not in the certificate": (f"localhost:{coord.port}", certs / "ca.crt",
                                        "mismatch"),
    }
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "privmed", "node", "--data", "synthetic", "--superlink", link,
         "--root-cert", str(ca), "--auth-key", key, "--home", str(tmp_path / str(i)),
         "--connect-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV) for i, (name, (link, ca, _)) in enumerate(cases.items())}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)  # three nodes start at once, under load
        assert proc.returncode == 4, (name, out, err)
        assert cases[name][2] in err and "Traceback" not in err, (name, err)
        assert err.strip().startswith("Error:"), (name, err)
    # Refused before any connection: a node given an expired CA certificate, a
    # coordinator given an expired certificate.
    node = privmed("node", "--data", "synthetic", "--superlink", coord.address, "--root-cert",
                   str(_expired_ca(tmp_path / "expired-ca.crt")), "--auth-key", key)
    assert node.returncode == 2 and "expired" in node.stderr, node.stderr
    expired = privmed("coordinator", "--heldout", "synthetic", "--certs", str(expired_ca),
                      "--out", str(tmp_path / "o"))
    assert expired.returncode == 2 and "expired" in expired.stderr, expired.stderr
    assert "Traceback" not in expired.stderr + node.stderr


def test_credentials_are_never_written_over_planted_files(tmp_path):
    """privmed certs creates every file anew: a key planted in advance (or a link to a
    file the attacker can read) makes it stop instead of writing the key there."""
    out = tmp_path / "certs"
    (out / "nodes").mkdir(parents=True)
    os.chmod(out / "nodes", 0o777)
    bait = tmp_path / "bait"
    bait.write_bytes(b"")
    (out / "nodes" / "site-1.key").symlink_to(bait)
    proc = privmed("certs", "--out", str(out), "--node", "site-1", "--host", "10.0.0.1")
    assert proc.returncode == 2 and "already exists" in proc.stderr, proc.stderr
    assert bait.read_bytes() == b""
    made = privmed("certs", "--out", str(tmp_path / "good"), "--node", "a", "--host", "10.0.0.1")
    assert made.returncode == 0, made.stderr
    good = tmp_path / "good"
    # A node key copied with loose permissions is refused, as ssh refuses one.
    copied = tmp_path / "a.key"
    copied.write_bytes((good / "nodes" / "a.key").read_bytes())
    os.chmod(copied, 0o644)
    node = privmed("node", "--data", "synthetic", "--superlink", "10.0.0.1:9092",
                   "--root-cert", str(good / "ca.crt"), "--auth-key", str(copied))
    assert node.returncode == 2 and "readable by others" in node.stderr, node.stderr
    for path, mode in [(good, 0o700), (good / "nodes", 0o700), (good / "ca.key", 0o600),
                       (good / "server.key", 0o600), (good / "nodes" / "a.key", 0o600),
                       (good / "ca.crt", 0o644), (good / "nodes" / "a.pub", 0o644)]:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
