"""Distributed DP over real Flower processes, and federation commands that must end in
one sentence (bad input, an unreachable coordinator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flower_procs import alive, privmed, site_dataset, site_ledger, site_rounds
from procs import wait_until


def test_distributed_dp_over_real_flower_processes(tmp_path):
    # the defaults (secure aggregation, distributed DP) and normalisation statistics
    out, ledgers = tmp_path / "sec", tmp_path / "ledgers"
    proc = privmed("federate", "--sites", "3", "--rounds", "3", "--batch-size", "128",
                   "--epsilon", "3", "--normalize", "--out", str(out),
                   "--ledger-dir", str(ledgers))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["federation"]["aggregator"] == "secagg"
    assert results["privacy"]["mode"] == "distributed"
    assert [r["contributors"] for r in results["federation"]["rounds"]] == [3, 3, 3]
    job_id = json.loads((out / "job.json").read_text())["job"]["job_id"]
    from privmed.federation.messages import statistics_from_sum
    from privmed.privacy import BudgetLedger

    stats = []
    for site in ("site-1", "site-2", "site-3"):
        path = site_ledger(out, site, ledgers)
        ledger = BudgetLedger(path)
        dataset = site_dataset(out, site)
        entries = {e["run_id"]: e["status"] for e in ledger.entries(dataset)}
        assert entries == {f"{job_id}-stats": "committed",
                           **{f"{job_id}-round-{r}": "committed" for r in (1, 2, 3)}}
        per_node = {p["node"]: p for p in results["privacy"]["per_node"]}
        # the coordinator hears each node's epsilon rounded up to 0.01 (secure aggregation)
        spent = ledger.spent(dataset)
        assert spent <= per_node[site]["epsilon"] <= spent + 0.01 + 1e-9
        saved = torch.load(site_rounds(out, site, ledgers) / job_id / "stats.pt",
                           weights_only=False)
        stats.append(saved["arrays"]["stats"])
    # the coordinator's statistics are exactly the unmasked sum of the nodes' noisy ones
    mean, std = statistics_from_sum(np.sum(stats, axis=0), 1)
    assert results["training"]["config"]["input_mean"] == pytest.approx(mean, abs=1e-4)
    assert results["training"]["config"]["input_std"] == pytest.approx(std, abs=1e-4)
    assert results["privacy"]["epsilon"] <= 3.0 + 0.01
    wait_until(lambda: not alive(str(out)), 15, "federate's processes to stop")


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
    wait_until(lambda: not alive(str(tmp_path)), 15, "the node's processes to stop")


def test_unreachable_coordinator_ends_the_node_in_one_sentence(tmp_path):
    from privmed.processes import free_port

    proc = privmed("node", "--data", "synthetic", "--superlink", f"127.0.0.1:{free_port()}",
                   "--home", str(tmp_path / "n"), "--connect-timeout", "3", "--insecure",
                   timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "Could not reach the coordinator" in proc.stderr and "Traceback" not in proc.stderr
    # Flower's SuperExec notices its SuperNode is gone within a second and exits.
    wait_until(lambda: not alive(str(tmp_path)), 15, "the node's processes to stop")
