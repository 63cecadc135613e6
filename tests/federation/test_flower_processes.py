"""Federated training with real Flower processes on loopback: a SuperLink, SuperNodes,
privmed's node workers, the ServerApp and ClientApp, all as separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

ENV = {**os.environ, "COLUMNS": "200"}


def privmed(*args: str, timeout: int = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privmed", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=cwd)


def start(*args: str, log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-m", "privmed", *args], stdout=fh,
                            stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def alive(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` in their arguments or their
    environment: privmed gives every Flower process a FLWR_HOME under the run's folder,
    and children inherit it, so this finds a run's leftovers and no other test's."""
    found = []
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if (marker in args or marker in env) and "pytest" not in args:
            found.append(args.strip())
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def assert_model_is_weighted_mean(out: Path, round_no: int, atol: float = 1e-5) -> int:
    """The saved global model is the examples-weighted mean of the models the three
    sites stored for ``round_no`` (their last); returns the total example count."""
    job_id = json.loads((out / "job.json").read_text())["job"]["job_id"]
    updates = []
    for site in ("site-1", "site-2", "site-3"):
        saved = torch.load(out / "nodes" / site / "ledger.sqlite.rounds" / job_id /
                           f"round-{round_no:04d}.pt", weights_only=False)
        updates.append((saved["arrays"], json.loads(saved["meta"])["num_examples"]))
    total = sum(n for _, n in updates)
    state = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    for key, value in state.items():
        if value.is_floating_point():
            expected = sum(a[key].astype(np.float64) * n for a, n in updates) / total
            np.testing.assert_allclose(value.numpy(), expected, atol=atol)
    return total


def test_federate_three_sites_then_crash_and_resume(tmp_path):
    out = tmp_path / "fed"
    args = ("federate", "--sites", "3", "--rounds", "4", "--dp", "local", "--normalize",
            "--local-epochs", "1",
            "--batch-size", "128", "--epsilon", "3", "--out", str(out))
    proc = start(*args, log=tmp_path / "first.log")
    rounds = out / "rounds.jsonl"
    wait_for(lambda: rounds.exists() and len(rounds.read_text().splitlines()) >= 2, 300,
             "two rounds")
    os.kill(proc.pid, signal.SIGKILL)  # the coordinator crashes hard
    proc.wait()
    wait_for(lambda: not alive(str(out)), 30, "the crashed run's processes to stop")
    done = len(rounds.read_text().splitlines())
    assert 2 <= done < 4 and (out / "checkpoint.pt").exists()

    resumed = privmed(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not alive(str(out)), "federate left processes behind"
    results = json.loads((out / "results.json").read_text())
    fed = results["federation"]
    assert [r["round"] for r in fed["rounds"]] == [1, 2, 3, 4]
    assert all(r["contributors"] == 3 for r in fed["rounds"])
    # better than chance on the held-out set, and the report has the federated tables
    assert results["metrics"]["test"]["roc_auc"] > 0.65
    assert "Federated rounds" in (out / "report.html").read_text() or \
        "Federation" in (out / "report.html").read_text()

    # No node charged its ledger twice: one committed spend per round, 4 rounds, plus the
    # normalisation statistics measured before round 1 (not again after the resume).
    from privmed.privacy import BudgetLedger

    for site in ("site-1", "site-2", "site-3"):
        entries = BudgetLedger(out / "nodes" / site / "ledger.sqlite").entries()
        assert sorted(e["run_id"].rsplit("-", 1)[1] for e in entries) == ["1", "2", "3", "4",
                                                                          "stats"]
        assert all(e["status"] == "committed" for e in entries)
    per_node = {p["node"]: p for p in results["privacy"]["per_node"]}
    assert set(per_node) == {"site-1", "site-2", "site-3"}
    assert results["privacy"]["epsilon"] == pytest.approx(max(p["epsilon"]
                                                              for p in per_node.values()))
    assert results["privacy"]["epsilon"] <= 3.0 * 1.01

    # The global model is the examples-weighted mean of the nodes' last-round models.
    # secure aggregation (the default) sums in fixed point: equal within its quantum
    assert_model_is_weighted_mean(out, 4)


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
    from privmed.federation.certs import add_node_key
    from privmed.federation.launcher import free_port

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
                  "--certs", str(certs), "--port", port, log=tmp_path / "coord.log")
    rogues: dict[str, subprocess.Popen] = {}
    try:
        wait_for(lambda: "listening" in (tmp_path / "coord.log").read_text(), 300,
                 "the coordinator to listen")
        # Attackers: a key the coordinator never registered, tried all job long and with a
        # short timeout, and a node with no key at all.
        rogue_key = add_node_key(tmp_path / "other", "rogue")
        rogues = {"rogue": node("rogue", *tls, "--auth-key", str(rogue_key),
                                "--connect-timeout", "0"),
                  "rogue-short": node("rogue-short", *tls, "--auth-key", str(rogue_key),
                                      "--connect-timeout", "20"),
                  "keyless": node("keyless", *tls)}
        for name, code, words in (("keyless", 4, "requires node authentication"),
                                  ("rogue-short", 4, "refused this node's key for 20 s")):
            assert rogues[name].wait(timeout=300) == code, (tmp_path / f"{name}.log").read_text()
            text = (tmp_path / f"{name}.log").read_text()
            assert words in text and "Traceback" not in text, text
        rounds = out / "rounds.jsonl"
        wait_for(lambda: rounds.exists() and rounds.read_text().strip(), 400, "round 1")
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


def test_simulation_engine_runs_the_same_apps(tmp_path):
    pytest.importorskip("ray", reason="privmed simulate needs the 'simulation' extra (Ray)")
    out = tmp_path / "sim"
    proc = privmed("simulate", "--sites", "8", "--rounds", "2", "--dp", "local",
                   "--local-epochs", "1",
                   "--batch-size", "64", "--epsilon", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["contributors"] for r in results["federation"]["rounds"]] == [8, 8]
    assert len(results["privacy"]["per_node"]) == 8
    assert results["privacy"]["epsilon"] <= 3.0 * 1.01
    assert results["metrics"]["test"]["roc_auc"] > 0.6
    for i in range(1, 9):  # every virtual site kept its own ledger
        assert (out / "nodes" / f"site-{i}.sqlite").exists()
    assert not alive(str(out)), "simulate left processes behind"


@pytest.mark.parametrize("args,words", [
    (["federate", "--data", "/nonexistent/xrays", "--out", "{tmp}/o"], ["/nonexistent/xrays"]),
    (["federate", "--site-data", "{tmp}/a.npz", "--out", "{tmp}/o"], ["--heldout"]),
    (["federate", "--dp", "central", "--out", "{tmp}/o"], ["central"]),
    (["federate", "--dp", "distributed", "--no-secure-agg", "--out", "{tmp}/o"],
     ["needs secure aggregation"]),
    (["node", "--data", "synthetic", "--superlink", "127.0.0.1:1", "--root-cert",
      "{tmp}/none.crt"], ["none.crt"]),
    (["node", "--data", "synthetic", "--superlink", "127.0.0.1:1", "--budget-epsilon", "3",
      "--insecure"], ["--ledger"]),
    (["certs", "--out", "{tmp}/c", "--node", "bad name!"], ["bad name!"]),
    (["certs", "--out", "{tmp}/c", "--node", "a", "--days", "0"], ["one day"]),
    # TLS is never turned off silently: no --root-cert / --certs needs --insecure
    (["node", "--data", "synthetic", "--superlink", "127.0.0.1:1"], ["--root-cert", "--insecure"]),
    (["node", "--data", "synthetic", "--superlink", "127.0.0.1:1", "--insecure", "--auth-key",
      "{tmp}/k"], ["--insecure"]),
    (["coordinator", "--heldout", "{tmp}/h.npz", "--out", "{tmp}/o"], ["--certs", "--insecure"]),
])
def test_bad_federation_input_is_one_sentence(tmp_path, args, words):
    proc = privmed(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().startswith("Error:")
    for w in words:
        assert w in proc.stderr
    # Flower's SuperExec notices its SuperNode is gone within a second and exits.
    wait_for(lambda: not alive(str(tmp_path)), 15, "the node's processes to stop")


def test_unreachable_coordinator_ends_the_node_in_one_sentence(tmp_path):
    from privmed.federation.launcher import free_port

    proc = privmed("node", "--data", "synthetic", "--superlink", f"127.0.0.1:{free_port()}",
                   "--home", str(tmp_path / "n"), "--connect-timeout", "3", "--insecure",
                   timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "Could not reach the coordinator" in proc.stderr and "Traceback" not in proc.stderr
    # Flower's SuperExec notices its SuperNode is gone within a second and exits.
    wait_for(lambda: not alive(str(tmp_path)), 15, "the node's processes to stop")


def test_distributed_dp_over_real_flower_processes(tmp_path):
    # the defaults (secure aggregation, distributed DP) and normalisation statistics
    out = tmp_path / "sec"
    proc = privmed("federate", "--sites", "3", "--rounds", "3", "--batch-size", "128",
                   "--epsilon", "3", "--normalize", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["federation"]["aggregator"] == "secagg"
    assert results["privacy"]["mode"] == "distributed"
    assert [r["contributors"] for r in results["federation"]["rounds"]] == [3, 3, 3]
    job_id = json.loads((out / "job.json").read_text())["job"]["job_id"]
    from privmed.federation.distributed import statistics_from_sum
    from privmed.privacy import BudgetLedger

    stats = []
    for site in ("site-1", "site-2", "site-3"):
        ledger = BudgetLedger(out / "nodes" / site / "ledger.sqlite")
        entries = {e["run_id"]: e["status"] for e in ledger.entries()}
        assert entries == {f"{job_id}-stats": "committed",
                           **{f"{job_id}-round-{r}": "committed" for r in (1, 2, 3)}}
        per_node = {p["node"]: p for p in results["privacy"]["per_node"]}
        # the coordinator hears each node's epsilon rounded up to 0.01 (secure aggregation)
        spent = ledger.summary()[0]["spent"]
        assert spent <= per_node[site]["epsilon"] <= spent + 0.01 + 1e-9
        saved = torch.load(out / "nodes" / site / "ledger.sqlite.rounds" / job_id / "stats.pt",
                           weights_only=False)
        stats.append(saved["arrays"]["stats"])
    # the coordinator's statistics are exactly the unmasked sum of the nodes' noisy ones
    mean, std = statistics_from_sum(np.sum(stats, axis=0), 1)
    assert results["training"]["config"]["input_mean"] == pytest.approx(mean, abs=1e-4)
    assert results["training"]["config"]["input_std"] == pytest.approx(std, abs=1e-4)
    assert results["privacy"]["epsilon"] <= 3.0 + 0.01
    wait_for(lambda: not alive(str(out)), 15, "federate's processes to stop")


def test_coordinator_names_missing_nodes_and_gives_up(tmp_path):
    """Fewer nodes than --min-nodes: the coordinator says which are missing while it waits
    and, after --node-wait, stops with one sentence naming them."""
    certs = tmp_path / "certs"
    assert privmed("certs", "--out", str(certs), "--node", "site-1", "--node", "site-2",
                   "--host", "127.0.0.1").returncode == 0
    assert privmed("data", "split", "synthetic", "--sites", "2", "--out",
                   str(tmp_path / "sites")).returncode == 0
    from privmed.federation.launcher import free_port

    port = str(free_port())
    node = start("node", "--data", str(tmp_path / "sites" / "site-1.npz"), "--superlink",
                 f"127.0.0.1:{port}", "--home", str(tmp_path / "n"), "--root-cert",
                 str(certs / "ca.crt"), "--auth-key", str(certs / "nodes" / "site-1.key"),
                 log=tmp_path / "node.log")
    try:
        coord = privmed("coordinator", "--heldout", str(tmp_path / "sites" / "test.npz"),
                        "--certs", str(certs), "--port", port, "--min-nodes", "2",
                        "--node-wait", "90", "--out", str(tmp_path / "run"), timeout=400)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
    assert coord.returncode == 4, coord.stdout + coord.stderr
    said = " ".join(coord.stdout.split())
    assert "Waiting for nodes: 1 of 2; not connected: site-2 (giving up in" in said, said
    err = " ".join(coord.stderr.split())
    assert err.startswith("Error: Fewer nodes than --min-nodes connected within 90 s "
                          "(--node-wait): 1 of 2; not connected: site-2"), err
    assert "Traceback" not in coord.stderr
    left = [line for line in alive(str(tmp_path)) if str(tmp_path) in line]
    assert not left, f"the coordinator left processes behind: {left}"
