"""`privmed coordinator` and `privmed node` as separate processes with TLS and SuperNode
authentication: a refused key, a killed node, and a coordinator that gives up waiting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flower_procs import alive, privmed, start
from procs import wait_until


def _key_material(certs: Path, homes: list[Path]) -> list[str]:
    """Base64 runs of every private key: the PEM bodies, and the workers' raw secrets."""
    import base64

    runs = []
    for key in [certs / "ca.key", certs / "server.key", *(certs / "nodes").glob("*.key")]:
        runs += [line for line in key.read_text().splitlines()
                 if line and not line.startswith("-----") and len(line) >= 40]
    for home in homes:
        secret = (home / "worker.key").read_bytes()
        runs += [base64.b64encode(secret).decode(), secret.hex()]
    return runs


def test_coordinator_with_tls_auth_refusal_and_a_killed_node(tmp_path):
    assert privmed("data", "split", "synthetic", "--sites", "3", "--out",
                   str(tmp_path / "sites")).returncode == 0
    certs = tmp_path / "certs"
    made = privmed("certs", "--out", str(certs), "--node", "site-1", "--node", "site-2",
                   "--node", "site-3")
    assert made.returncode == 0, made.stderr
    from privmed.federation.runtime.certs import add_node_key
    from privmed.processes import free_port

    port = str(free_port())
    out = tmp_path / "run"
    tls = ("--root-cert", str(certs / "ca.crt"))

    def node(site: str, *extra: str, data: str = "site-1") -> subprocess.Popen:
        return start("node", "--data", str(tmp_path / "sites" / f"{data}.npz"), "--superlink",
                     f"127.0.0.1:{port}", "--name", site, "--home", str(tmp_path / site),
                     *extra, log=tmp_path / f"{site}.log")

    # site-2's budget fits one round of this job (epsilon 1.85), not two (2.48).
    budgets = {"site-1": "10", "site-2": "2.2", "site-3": "10"}
    # The nodes start first: they keep trying until the coordinator is up (no sleep).
    nodes = {site: node(site, "--ledger", str(tmp_path / f"{site}.sqlite"),
                        "--budget-epsilon", budget, *tls,
                        "--auth-key", str(certs / "nodes" / f"{site}.key"), data=site)
             for site, budget in budgets.items()}
    coord = start("coordinator", "--heldout", str(tmp_path / "sites" / "test.npz"), "--out",
                  str(out), "--rounds", "3", "--dp", "local", "--no-normalize",
                  "--local-epochs", "1", "--batch-size", "128",
                  "--epsilon", "3", "--min-nodes", "3", "--round-timeout", "60",
                  # self masks in every round: the round a node dies in is recovered
                  "--no-secagg-optimistic",
                  "--certs", str(certs), "--port", port, log=tmp_path / "coord.log")
    rogues: dict[str, subprocess.Popen] = {}
    try:
        wait_until(lambda: "listening" in (tmp_path / "coord.log").read_text(), 300,
                   "the coordinator to listen")
        # Attackers: a key the coordinator never registered, tried all job long and with a
        # short timeout, and a node with no key at all.
        rogue_key = add_node_key(tmp_path / "other", "rogue")
        rogues = {"rogue": node("rogue", *tls, "--auth-key", str(rogue_key),
                                "--connect-timeout", "0"),
                  "rogue-short": node("rogue-short", *tls, "--auth-key", str(rogue_key),
                                      "--connect-timeout", "45"),
                  "keyless": node("keyless", *tls)}
        for name, code, words in (("keyless", 4, "requires node authentication"),
                                  ("rogue-short", 4, "refused this node's key for 45 s")):
            assert rogues[name].wait(timeout=300) == code, (tmp_path / f"{name}.log").read_text()
            text = (tmp_path / f"{name}.log").read_text()
            assert words in text and "Traceback" not in text, text
        rounds = out / "rounds.jsonl"
        wait_until(lambda: rounds.exists() and rounds.read_text().strip(), 400, "round 1")
        os.killpg(nodes["site-3"].pid, signal.SIGKILL)  # a hospital's node dies
        assert coord.wait(timeout=600) == 0, (tmp_path / "coord.log").read_text()
        assert rogues["rogue"].poll() is None, "the rogue node should still be knocking"
    finally:
        for p in [coord, *nodes.values(), *rogues.values()]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    results = json.loads((out / "results.json").read_text())
    by_round = {r["round"]: {n["node"]: n for n in r["nodes"]} for r in
                results["federation"]["rounds"]}
    assert all(n["status"] == "ok" for n in by_round[1].values()) and len(by_round[1]) == 3
    # site-2 refused round 2 with its reason; the killed site-3 failed it; site-1 went on
    assert by_round[2]["site-1"]["status"] == "ok"
    assert by_round[2]["site-2"]["status"] == "refused"
    assert "budget" in by_round[2]["site-2"]["reason"]
    assert by_round[2]["site-3"]["status"] == "error"
    assert all(r["status"] == "ok" for r in results["federation"]["rounds"])
    sites = {s["node"]: s for s in results["federation"]["sites"]}
    assert sites["site-2"]["rounds_refused"] >= 1 and sites["site-3"]["rounds_failed"] >= 1
    log = (tmp_path / "coord.log").read_text()
    assert "site-2 refused" in log
    # The rogue knocked all job long and never got work: no node of that name in any
    # round, no round in its log, only the coordinator's refusals.
    assert {n for r in by_round.values() for n in r} == {"site-1", "site-2", "site-3"}
    rogue_log = (tmp_path / "rogue.log").read_text()
    assert "does not accept this node's key yet" in rogue_log and "Round" not in rogue_log
    assert "connected; it serves" not in rogue_log
    # No private key, nor a worker's secret, appears in any log or output of the run.
    logs = [f for f in tmp_path.rglob("*") if f.is_file() and f.suffix in (".log", ".txt",
                                                                            ".jsonl", ".json")]
    homes = [tmp_path / s for s in budgets]
    for run in _key_material(certs, homes):
        leaked = [str(f) for f in logs if run in f.read_text(errors="replace")]
        assert not leaked, f"key material in {leaked}"
    # Secrets at rest: folders 0700, keys 0600.
    for path, mode in [(certs, 0o700), (certs / "nodes", 0o700), (certs / "ca.key", 0o600),
                       (certs / "server.key", 0o600), (certs / "nodes" / "site-1.key", 0o600),
                       *[(h, 0o700) for h in homes], *[(h / "worker.key", 0o600) for h in homes],
                       (out / "coordinator" / "loopback-tls", 0o700),
                       (out / "coordinator" / "loopback-tls" / "server.key", 0o600)]:
        assert path.stat().st_mode & 0o777 == mode, f"{path}: {oct(path.stat().st_mode)}"


def test_coordinator_names_missing_nodes_and_gives_up(tmp_path):
    """Fewer nodes than --min-nodes: the coordinator says which are missing while it waits
    and, after --node-wait, stops with one sentence naming them."""
    certs = tmp_path / "certs"
    assert privmed("certs", "--out", str(certs), "--node", "site-1", "--node", "site-2",
                   "--host", "127.0.0.1").returncode == 0
    assert privmed("data", "split", "synthetic", "--sites", "2", "--out",
                   str(tmp_path / "sites")).returncode == 0
    from privmed.processes import free_port

    port = str(free_port())
    node = start("node", "--data", str(tmp_path / "sites" / "site-1.npz"), "--superlink",
                 f"127.0.0.1:{port}", "--home", str(tmp_path / "n"), "--root-cert",
                 str(certs / "ca.crt"), "--auth-key", str(certs / "nodes" / "site-1.key"),
                 log=tmp_path / "node.log")
    try:
        coord = privmed("coordinator", "--heldout", str(tmp_path / "sites" / "test.npz"),
                        "--certs", str(certs), "--port", port, "--min-nodes", "2",
                        "--node-wait", "45", "--out", str(tmp_path / "run"), timeout=400)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
    assert coord.returncode == 4, coord.stdout + coord.stderr
    said = " ".join(coord.stdout.split())
    assert "Waiting for nodes: 1 of 2; not connected: site-2 (giving up in" in said, said
    err = " ".join(coord.stderr.split())
    assert err.startswith("Error: Fewer nodes than --min-nodes connected within 45 s "
                          "(--node-wait): 1 of 2; not connected: site-2"), err
    assert "Traceback" not in coord.stderr
    left = [line for line in alive(str(tmp_path)) if str(tmp_path) in line]
    assert not left, f"the coordinator left processes behind: {left}"
