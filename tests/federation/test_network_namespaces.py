"""The README's "Running across hospitals" on a real network: the coordinator in one
network namespace (10.77.0.1), two hospitals in another, joined by a veth pair. The
certificate names the coordinator's external address only, and the nodes start before
the coordinator. Needs root (CAP_NET_ADMIN) and iproute2; skipped otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_run import run_cli
from procs import ENV, privmed_cmd, stop, wait_until
from procs import start as start_process

pytest.importorskip("flwr")

COORD_IP, HOSPITAL_IP, PORT = "10.77.0.1", "10.77.0.2", 9092


@dataclass
class Namespaces:
    coordinator: str
    hospitals: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, ns: str, args: list[str], log: Path) -> subprocess.Popen:
        """``python -m privmed ARGS`` inside namespace ``ns``."""
        proc = start_process(["ip", "netns", "exec", ns, *privmed_cmd(*args)], log,
                              env=_env())
        self.procs.append(proc)
        return proc

    def run(self, ns: str, code: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                              capture_output=True, text=True, env=_env(), timeout=120)


def _env() -> dict[str, str]:
    return {**ENV, "PYTHONUNBUFFERED": "1"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def namespaces():
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are a Linux feature")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_NET_ADMIN)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's 'ip' command is not installed")
    tag = secrets.token_hex(3)  # unique per run: other test runs may use namespaces too
    ns = Namespaces(f"pm-coord-{tag}", f"pm-hosp-{tag}")
    veth_c, veth_h = f"pmc{tag}", f"pmh{tag}"
    made: list[str] = []
    try:
        for name in (ns.coordinator, ns.hospitals):
            added = _ip("netns", "add", name, check=False)
            if added.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {added.stderr.strip()}")
            made.append(name)
        try:
            _ip("link", "add", veth_c, "type", "veth", "peer", "name", veth_h)
            _ip("link", "set", veth_c, "netns", ns.coordinator)
            _ip("link", "set", veth_h, "netns", ns.hospitals)
            for name, dev, addr in ((ns.coordinator, veth_c, COORD_IP),
                                    (ns.hospitals, veth_h, HOSPITAL_IP)):
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", name, "link", "set", dev, "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot wire the namespaces with a veth pair: {exc.stderr.strip()}")
        yield ns
    finally:
        for proc in ns.procs:
            stop(proc)
        for name in made:
            # Whatever still runs in our own namespaces was started by this test.
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
        _ip("link", "del", veth_c, check=False)  # only if it never left the root namespace


@pytest.mark.slow
@pytest.mark.parametrize("listen", ["0.0.0.0", COORD_IP])
def test_readme_federation_across_network_namespaces(namespaces, tmp_path, listen):
    ns = namespaces
    sites = tmp_path / "sites"
    split = run_cli(["data", "split", "synthetic", "--sites", "2", "--out", str(sites)],
                    env=_env(), timeout=300)
    assert split.returncode == 0, split.stderr
    certs = tmp_path / "fed-certs"
    made = run_cli(["certs", "--out", str(certs), "--host", COORD_IP, "--node", "site-1",
                    "--node", "site-2"], env=_env(), timeout=120)
    assert made.returncode == 0, made.stderr
    from cryptography import x509

    san = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == [COORD_IP]
    assert san.get_values_for_type(x509.DNSName) == []  # no loopback, no localhost

    # The hospitals first: the coordinator is not there yet, they keep trying.
    nodes = {site: ns.start(ns.hospitals, [
        "node", "--data", str(sites / f"{site}.npz"), "--name", site,
        "--superlink", f"{COORD_IP}:{PORT}", "--ledger", str(tmp_path / f"{site}.sqlite"),
        "--budget-epsilon", "8", "--root-cert", str(certs / "ca.crt"),
        "--auth-key", str(certs / "nodes" / f"{site}.key"), "--max-sites", "2",
        "--home", str(tmp_path / site)], tmp_path / f"{site}.log")
        for site in ("site-1", "site-2")}
    wait_until(lambda: all("is connecting" in (tmp_path / f"{s}.log").read_text()
                           for s in nodes), 180, "the nodes to start")
    # Deliberate: with no coordinator for a while yet, the nodes must keep trying, not give up.
    time.sleep(3)
    assert all(p.poll() is None for p in nodes.values())

    out = tmp_path / "run"
    coord = ns.start(ns.coordinator, [
        "coordinator", "--heldout", str(sites / "test.npz"), "--host", listen, "--port",
        str(PORT), "--certs", str(certs), "--rounds", "2", "--dp", "local", "--local-epochs",
        "1", "--batch-size", "128", "--epsilon", "3", "--min-nodes", "2", "--no-normalize",
        "--node-wait", "300", "--out", str(out)], tmp_path / "coord.log")
    wait_until(lambda: "listening" in (tmp_path / "coord.log").read_text()
               or coord.poll() is not None, 180, "the coordinator to listen")
    assert coord.poll() is None, (tmp_path / "coord.log").read_text()

    # From the hospitals' network the Control API is out of reach (a key of one's own
    # cannot be registered), while the Fleet API admits the registered nodes.
    attack = ns.run(ns.hospitals, (
        "from pathlib import Path\n"
        "from privmed.federation.runtime.certs import add_node_key\n"
        "from privmed.federation.runtime.launcher import FlowerCli\n"
        f"cli = FlowerCli(Path({str(tmp_path / 'atk')!r}), '{COORD_IP}:{PORT}',"
        f" Path({str(certs / 'ca.crt')!r}))\n"
        f"key = add_node_key(Path({str(tmp_path / 'atk-keys')!r}), 'mallory')\n"
        "try:\n    cli.register(key.with_suffix('.pub'))\n    print('REGISTERED')\n"
        "except Exception as exc:\n    print('REFUSED', exc)\n"))
    assert "REFUSED" in attack.stdout and "Not Found" in attack.stdout, attack

    assert coord.wait(timeout=600) == 0, (tmp_path / "coord.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert [r["contributors"] for r in results["federation"]["rounds"]] == [2, 2]
    assert {n["node"] for n in results["privacy"]["per_node"]} == {"site-1", "site-2"}
    for site in nodes:
        log = (tmp_path / f"{site}.log").read_text()
        assert "is connected" in log and "Round 2: ok" in log, log
        assert "WITHOUT TLS" not in log
    gateway = (out / "coordinator" / "gateway.log").read_text()
    assert "WITHOUT TLS" not in gateway and f"refused POST '/v1/control/register-node' " \
        f"from {HOSPITAL_IP}" in gateway
