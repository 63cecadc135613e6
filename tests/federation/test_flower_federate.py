"""Federated training with real Flower processes on loopback: `privmed federate` (a
SuperLink, SuperNodes, node workers, the ServerApp and ClientApp as separate processes),
a crash and a resume, and the same apps on Flower's simulation engine."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flower_procs import alive, privmed, site_dataset, site_ledger, site_rounds, start
from procs import wait_until


def assert_model_is_weighted_mean(out: Path, ledgers: Path, round_no: int,
                                  atol: float = 1e-5) -> int:
    """The saved global model is the examples-weighted mean of the models the three
    sites stored for ``round_no`` (their last); returns the total example count."""
    job_id = json.loads((out / "job.json").read_text())["job"]["job_id"]
    updates = []
    for site in ("site-1", "site-2", "site-3"):
        saved = torch.load(site_rounds(out, site, ledgers) / job_id / f"round-{round_no:04d}.pt",
                           weights_only=False)
        updates.append((saved["arrays"], json.loads(saved["meta"])["num_examples"]))
    total = sum(n for _, n in updates)
    state = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    for key, value in state.items():
        if value.is_floating_point():
            expected = sum(a[key].astype(np.float64) * n for a, n in updates) / total
            np.testing.assert_allclose(value.numpy(), expected, atol=atol)
    return total


def test_federate_three_sites_then_crash_and_resume(tmp_path):
    out, ledgers = tmp_path / "fed", tmp_path / "ledgers"
    args = ("federate", "--sites", "3", "--rounds", "4", "--dp", "local", "--normalize",
            "--local-epochs", "1", "--batch-size", "128", "--epsilon", "3", "--out", str(out),
            "--ledger-dir", str(ledgers))
    proc = start(*args, log=tmp_path / "first.log")
    rounds = out / "rounds.jsonl"
    wait_until(lambda: rounds.exists() and len(rounds.read_text().splitlines()) >= 2, 600,
               "two rounds")
    os.kill(proc.pid, signal.SIGKILL)  # the coordinator crashes hard
    proc.wait()
    wait_until(lambda: not alive(str(out)), 90, "the crashed run's processes to stop")
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
        # the site's ledger is keyed to its data in --ledger-dir, not kept inside --out
        assert not (out / "nodes" / site / "ledger.sqlite").exists()
        entries = BudgetLedger(site_ledger(out, site, ledgers)).entries(site_dataset(out, site))
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
    total = assert_model_is_weighted_mean(out, ledgers, 4)

    # What the coordinator knows, and no more (secure aggregation): the sites' summed
    # image count, each site's (epsilon, delta), the weakest site's as the headline;
    # image counts, sigma and q per site are null and named hidden, never 0.
    assert results["data"]["sizes"]["train"] == total
    assert results["privacy"]["delta"] == max(p["delta"] for p in per_node.values())
    assert results["privacy"]["noise_multiplier"] is None and results["privacy"]["history"] == []
    assert {"num_examples", "noise_multiplier", "sample_rate"} <= set(fed["hidden"])
    assert all(s["num_examples"] is None and s["ledger"] == "kept by the site"
               for s in fed["sites"])
    assert all(p["noise_multiplier"] is None for p in per_node.values())
    page = (out / "report.html").read_text()
    assert "hidden" in page and "kept by each site" in page and "not recorded" not in page


def test_simulation_engine_runs_the_same_apps(tmp_path):
    pytest.importorskip("ray", reason="privmed simulate needs the 'simulation' extra (Ray)")
    out, ledgers = tmp_path / "sim", tmp_path / "ledgers"
    proc = privmed("simulate", "--sites", "4", "--rounds", "2", "--dp", "local",
                   "--local-epochs", "1", "--batch-size", "64", "--epsilon", "3",
                   "--out", str(out), "--ledger-dir", str(ledgers))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["contributors"] for r in results["federation"]["rounds"]] == [4, 4]
    assert len(results["privacy"]["per_node"]) == 4
    assert results["privacy"]["epsilon"] <= 3.0 * 1.01
    assert results["metrics"]["test"]["roc_auc"] > 0.6
    for i in range(1, 5):  # every virtual site kept its own ledger, keyed to its data
        assert site_ledger(out, f"site-{i}", ledgers).exists()
    # Ray's actors end a moment after the driver; they must end, not linger
    wait_until(lambda: not alive(str(out)), 60, "simulate's processes to stop")
