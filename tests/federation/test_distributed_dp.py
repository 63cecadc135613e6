"""Distributed DP (Dopamine FedSGD) and federated normalisation statistics, in one process:
real nodes, real SQLite ledgers, real secure aggregation (InProcessTransport calls the
same request handler as the node worker)."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from federation_kit import site_nodes

from privmed.data import split_sites
from privmed.errors import ConfigError
from privmed.federation import FederationConfig, InProcessTransport, SiteNode, run_federation
from privmed.federation.messages import (
    VECTOR_SCALE,
    state_to_arrays,
    statistics_from_sum,
    trainable_keys,
)
from privmed.federation.node.updates import noisy_gradient
from privmed.models import create_model
from privmed.privacy import BudgetLedger, compute_epsilon, history_from_json

# the synthetic X-rays of the bundle fixture (tests/federation/conftest.py)
SYNTHETIC = dict(n_train=1200, n_val=150, n_test=300, seed=7)


_nodes = functools.partial(site_nodes, first_id=2000)  # this module's node ids


def _job(**kw):
    base = dict(job_id="dist", model="scatter-linear", rounds=2, batch_size=64, epsilon=3.0,
                lr=0.05, normalize=True)
    return FederationConfig(**{**base, **kw})


def _stored(tmp_path, site, job_id, name):
    saved = torch.load(tmp_path / f"site{site}.sqlite.rounds" / job_id / name,
                       weights_only=False)
    return json.loads(saved["meta"]), saved["arrays"]


def _entries(tmp_path, site):
    return {e["run_id"]: e for e in BudgetLedger(tmp_path / f"site{site}.sqlite").entries()}


def test_distributed_dp_is_the_default_and_needs_secure_aggregation():
    assert _job().dp == "distributed"
    assert _job(secure_agg=False).dp == "local"
    with pytest.raises(ConfigError, match="needs secure aggregation"):
        _job(dp="distributed", secure_agg=False)


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_global_step_is_adam_on_the_sum_of_the_nodes_noisy_gradients(bundle, tmp_path):
    nodes = _nodes(bundle, tmp_path)
    job = _job(rounds=1)
    results = run_federation(InProcessTransport(nodes), job, bundle.test, tmp_path / "run",
                             log=lambda s: None)
    assert results["privacy"]["mode"] == "distributed"
    # what each node sent before masking (stored for replay), summed by hand
    vectors = [_stored(tmp_path, i, "dist", "round-0001.pt")[1]["grad"] for i in range(3)]
    total = np.sum(vectors, axis=0) * VECTOR_SCALE
    g = total[:-1] / total[-1]
    assert total[-1] == pytest.approx(3 * 64)  # expected batch: B per node
    torch.manual_seed(job.seed)
    init = state_to_arrays(create_model(job.model, 1, 2, image_size=[28, 28]))
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["state_dict"]
    model = create_model(job.model, 1, 2, image_size=[28, 28])
    offset = 0
    for key in trainable_keys(model):
        size = init[key].size
        grad = g[offset:offset + size].reshape(init[key].shape)
        offset += size
        # Adam's first step moves every coordinate by lr * sign(gradient)
        clear = np.abs(grad) > 1e-3  # far from the fixed-point quantum
        step = state[key].numpy() - init[key]
        np.testing.assert_allclose(step[clear], -job.lr * np.sign(grad[clear]), rtol=1e-3)
    # the coordinator learnt the sum of the expected batch sizes, not each node's count:
    # the counts are hidden (null), never 0, and so is the train size
    assert all(n["num_examples"] is None for n in results["federation"]["rounds"][0]["nodes"])
    assert results["data"]["sizes"]["train"] is None
    assert results["data"]["sizes_hidden"] == ["train"]


def test_each_node_adds_its_share_of_the_noise(bundle, tmp_path):
    # batch 1: the clipped gradient sum is tiny next to the noise, so the vector is noise
    node = SiteNode(split_sites(bundle, 3, seed=0)[0], ledger=tmp_path / "n.sqlite",
                    budget_epsilon=100.0, name="n")
    job = _job(batch_size=1, normalize=False, max_grad_norm=1.0)
    model = create_model(job.model, 1, 2, image_size=[28, 28])
    threshold = 4
    reply = noisy_gradient(node, job, 1, state_to_arrays(model), threshold,
                           trainable_keys(model))
    assert reply.status == "ok", reply.reason
    sigma = node.plan(job).noise_multiplier
    noise = reply.arrays["grad"][:-1] * VECTOR_SCALE
    assert np.std(noise) == pytest.approx(sigma / math.sqrt(threshold), rel=0.05)
    assert reply.privacy["noise_share"] == pytest.approx(0.5)
    # asked again (a retried round): the same vector, never fresh noise
    again = noisy_gradient(node, job, 1, state_to_arrays(model), threshold,
                           trainable_keys(model))
    assert again.replayed
    np.testing.assert_array_equal(again.arrays["grad"], reply.arrays["grad"])


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_ledger_matches_the_report_and_the_target(bundle, tmp_path):
    nodes = _nodes(bundle, tmp_path)
    job = _job(rounds=3)
    results = run_federation(InProcessTransport(nodes), job, bundle.test, tmp_path / "run",
                             log=lambda s: None)
    for i, row in enumerate(results["privacy"]["per_node"]):
        entries = _entries(tmp_path, i)
        assert {e["status"] for e in entries.values()} == {"committed"}
        assert set(entries) == {"dist-stats", "dist-round-1", "dist-round-2", "dist-round-3"}
        ledger = BudgetLedger(tmp_path / f"site{i}.sqlite")
        spent = ledger.summary()[0]["spent"]
        # the coordinator hears each node's epsilon rounded up to 0.01, never below
        assert spent <= row["epsilon"] <= spent + 0.01 + 1e-9
        assert 0.97 * job.epsilon <= spent <= job.epsilon  # calibrated to the target
        assert row["rounds_trained"] == 3


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_round_below_threshold_is_retried_then_failed_and_charged_once(bundle, tmp_path):
    # two of three nodes vanish after round 1: one survivor < threshold 2 (every round
    # with self masks: an optimistic round with a missing vector is not retried)
    nodes = _nodes(bundle, tmp_path)
    ids = list(nodes)
    transport = InProcessTransport(nodes, silent={ids[1]: 2, ids[2]: 2})
    job = _job(rounds=3, round_retries=1, secagg_optimistic=False)
    results = run_federation(transport, job, bundle.test, tmp_path / "run", log=lambda s: None)
    rounds = results["federation"]["rounds"]
    assert [r["status"] for r in rounds] == ["ok", "failed", "failed"]
    assert transport.calls.count(2) == 2 and transport.calls.count(3) == 2  # retried once
    entries = _entries(tmp_path, 0)
    assert entries["dist-round-1"]["status"] == "committed"
    # Rounds 2 and 3: site-0's noisy gradient left it (masked) though its peers never
    # answered: from then on it was out of its hands, so it stays charged, once each,
    # though never unmasked (the retry re-sent the stored vector at no extra charge).
    assert entries["dist-round-2"]["status"] == entries["dist-round-3"]["status"] == \
        "committed"
    committed = [history_from_json(e["history"]) for e in entries.values()
                 if e["status"] == "committed"]
    eps = compute_epsilon([h for hist in committed for h in hist],
                          results["privacy"]["per_node"][0]["delta"], "prv")
    reported = results["privacy"]["per_node"][0]["epsilon"]
    # the report counts what the ledger charged, rounded up to 0.01 for the coordinator
    assert eps <= reported <= eps + 0.01 + 1e-9
    assert results["privacy"]["per_node"][0]["rounds_trained"] == 3


def test_node_over_budget_drops_out_and_the_round_keeps_full_noise(bundle, tmp_path):
    # site-0 can afford the statistics but not the job: it sends no masked input, and the
    # round (with self masks: not optimistic) is unmasked without it
    nodes = _nodes(bundle, tmp_path, budgets=(0.5, 10.0, 10.0))
    results = run_federation(InProcessTransport(nodes), _job(rounds=1, secagg_optimistic=False),
                             bundle.test, tmp_path / "run", log=lambda s: None)
    first = {n["node"]: n for n in results["federation"]["rounds"][0]["nodes"]}
    assert first["site-0"]["status"] == "refused"
    assert results["federation"]["rounds"][0]["status"] == "ok"
    assert "dist-round-1" not in _entries(tmp_path, 0)


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_normalisation_statistics_through_secure_aggregation(bundle, tmp_path):
    nodes = _nodes(bundle, tmp_path)
    job = _job(rounds=1, norm_noise_multiplier=2.0)
    results = run_federation(InProcessTransport(nodes), job, bundle.test, tmp_path / "run",
                             log=lambda s: None)
    config = results["training"]["config"]
    images = torch.cat([n.bundle.train.images for n in nodes.values()])
    # the released statistics are exactly those of the nodes' noisy sums ...
    total = np.sum([_stored(tmp_path, i, "dist", "stats.pt")[1]["stats"] for i in range(3)],
                   axis=0)
    mean, std = statistics_from_sum(total, 1)
    assert config["input_mean"] == pytest.approx(mean, abs=1e-4)
    assert config["input_std"] == pytest.approx(std, abs=1e-4)
    # ... which are close to the pooled data's (count and sums carry noise of std ~4)
    assert config["input_mean"][0] == pytest.approx(float(images.mean()), abs=0.03)
    assert config["input_std"][0] == pytest.approx(float(images.std()), abs=0.05)
    # charged to every ledger as one Gaussian release on all of the node's data
    for i in range(3):
        stats = _entries(tmp_path, i)["dist-stats"]
        assert stats["status"] == "committed"
        assert history_from_json(stats["history"]) == [(2.0, 1.0, 1)]
    # the saved model standardises with them
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert model["kwargs"]["input_mean"] == config["input_mean"]


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_local_dp_counts_the_statistics_in_its_target(bundle, tmp_path):
    nodes = _nodes(bundle, tmp_path)
    job = _job(dp="local", rounds=2, local_epochs=1)
    results = run_federation(InProcessTransport(nodes), job, bundle.test, tmp_path / "run",
                             log=lambda s: None)
    for i, row in enumerate(results["privacy"]["per_node"]):
        spent = BudgetLedger(tmp_path / f"site{i}.sqlite").summary()[0]["spent"]
        # the coordinator hears each node's epsilon rounded up to 0.01, never below
        assert spent <= row["epsilon"] <= spent + 0.01 + 1e-9
        assert 0.97 * job.epsilon <= spent <= job.epsilon


class CrashingTransport(InProcessTransport):
    """The coordinator 'crashes' when it first sends round ``at``."""

    def __init__(self, nodes, at):
        super().__init__(nodes)
        self.at = at

    def train(self, node_ids, request, timeout):
        if request.round == self.at:
            self.at = None
            raise RuntimeError("coordinator crashed")
        return super().train(node_ids, request, timeout)


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_resume_keeps_the_server_optimizer_and_charges_once(bundle, tmp_path):
    nodes = _nodes(bundle, tmp_path)
    job = _job(rounds=3)
    transport = CrashingTransport(nodes, at=2)
    with pytest.raises(RuntimeError, match="crashed"):
        run_federation(transport, job, bundle.test, tmp_path / "run", log=lambda s: None)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert saved["round"] == 1
    assert saved["aggregator"]["optimizer"]["scheduler"]["last_epoch"] == 1
    results = run_federation(transport, job, bundle.test, tmp_path / "run", resume=True,
                             log=lambda s: None)
    assert [r["status"] for r in results["federation"]["rounds"]] == ["ok"] * 3
    # statistics measured once, before the crash; no round charged twice
    assert transport.calls.count(0) == 1
    for i in range(3):
        entries = _entries(tmp_path, i)
        assert sorted(entries) == ["dist-round-1", "dist-round-2", "dist-round-3", "dist-stats"]
        assert {e["status"] for e in entries.values()} == {"committed"}


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_threshold_sets_each_nodes_noise_share(bundle, tmp_path):
    with pytest.raises(ConfigError, match="threshold"):
        _job(secagg_threshold=0.3)
    nodes = _nodes(bundle, tmp_path)
    run_federation(InProcessTransport(nodes), _job(rounds=1, normalize=False,
                                                   secagg_threshold=1.0),
                   bundle.test, tmp_path / "run", log=lambda s: None)
    for i in range(3):  # all three must survive: each adds 1/sqrt(3) of the noise
        meta, _ = _stored(tmp_path, i, "dist", "round-0001.pt")
        assert meta["privacy"]["noise_share"] == pytest.approx(1 / math.sqrt(3))
