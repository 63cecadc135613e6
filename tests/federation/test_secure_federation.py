"""Secure aggregation inside the federation: in one process (real nodes, ledgers, keys)
and with real Flower processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from federation_kit import site_nodes

from privmed.federation import (
    FederationConfig,
    InProcessTransport,
    SiteNode,
    run_federation,
)
from privmed.federation.messages import ENCODING, WEIGHT_SCALE

pytestmark = pytest.mark.slow  # in-process, but long: make test-fast leaves it out

# the synthetic X-rays of the bundle fixture (tests/federation/conftest.py)
SYNTHETIC = dict(n_train=1200, n_val=150, n_test=300, seed=5)


def _nodes(bundle, tmp_path, budgets) -> dict[int, SiteNode]:
    return site_nodes(bundle, tmp_path, budgets, first_id=1000)  # this module's node ids


def _job(**kw):
    return FederationConfig(**{**dict(job_id="sec", model="scatter-linear", rounds=2,
                                      local_epochs=1, batch_size=64, epsilon=3.0,
                                      secure_agg=True, dp="local", normalize=False), **kw})


def _weighted_mean_of_stored(tmp_path, names, job_id, round_no):
    updates = []
    for i in names:
        saved = torch.load(tmp_path / f"site{i}.sqlite.rounds" / job_id /
                           f"round-{round_no:04d}.pt", weights_only=False)
        updates.append((saved["arrays"], json.loads(saved["meta"])["num_examples"]))
    total = sum(n for _, n in updates)
    keys = updates[0][0]
    return {k: sum(a[k].astype(np.float64) * n for a, n in updates) / total for k in keys}, total


def _bound(parties: int, total_examples: int) -> float:
    # each party's value is off by at most one quantum; the sum is divided by total / K
    return parties * ENCODING.quantum * WEIGHT_SCALE / total_examples * 2 + 1e-7


def test_secure_aggregate_equals_the_plain_weighted_mean(bundle, tmp_path):
    nodes = _nodes(bundle, tmp_path, (10, 10, 10, 10))
    job = _job()
    results = run_federation(InProcessTransport(nodes), job, bundle.test, tmp_path / "run",
                             log=lambda s: None)
    assert results["federation"]["aggregator"] == "secagg"
    # the coordinator never saw a node's example count, only their sum
    assert all(n["num_examples"] is None for r in results["federation"]["rounds"]
               for n in r["nodes"])
    expected, total = _weighted_mean_of_stored(tmp_path, range(4), "sec", 2)
    assert results["data"]["sizes"]["train"] == total
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["state_dict"]
    for key, value in expected.items():
        np.testing.assert_allclose(state[key].numpy(), value, atol=_bound(4, total))


def test_refusing_and_vanished_nodes_do_not_stop_the_round(bundle, tmp_path):
    # site-1 refuses round 2 on its budget (masked zeros); site-3 dies after round 1.
    # With self masks in every round (not optimistic), the round survives the dropout.
    nodes = _nodes(bundle, tmp_path, (10, 2.3, 10, 10))
    ids = list(nodes)
    job = _job(secagg_optimistic=False)
    transport = InProcessTransport(nodes, silent={ids[3]: 2})
    results = run_federation(transport, job, bundle.test, tmp_path / "run", log=lambda s: None)
    second = {n["node"]: n for n in results["federation"]["rounds"][1]["nodes"]}
    assert second["site-1"]["status"] == "refused"
    assert second["site-3"]["status"] == "error"
    assert results["federation"]["rounds"][1]["status"] == "ok"
    expected, total = _weighted_mean_of_stored(tmp_path, (0, 2), "sec", 2)
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["state_dict"]
    for key, value in expected.items():
        np.testing.assert_allclose(state[key].numpy(), value, atol=_bound(3, total))
