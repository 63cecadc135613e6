"""Nodes, aggregation and the coordinator's loop, in one process (no Flower): real
fit(), real SQLite ledgers, a transport that calls the nodes directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from federation_kit import site_nodes

from privmed.data import split_sites
from privmed.federation import FederationConfig, PlainAggregator, SiteNode, run_federation
from privmed.federation.coordinator.strategies import check_update, weighted_mean
from privmed.federation.messages import NodeReply, RoundRequest, state_to_arrays
from privmed.federation.node.updates import train_round
from privmed.models import create_model
from privmed.privacy import BudgetLedger


class DirectTransport:
    """Calls each SiteNode in turn; ``fail_at`` raises in that round (a crash)."""

    def __init__(self, nodes: dict[int, SiteNode], fail_at: int | None = None) -> None:
        self.nodes, self.fail_at, self.calls = nodes, fail_at, []

    def node_ids(self) -> list[int]:
        return list(range(len(self.nodes)))

    def train(self, ids, request, timeout):
        if request.round == self.fail_at:
            raise RuntimeError("coordinator crashed")
        self.calls.append(request.round)
        return {i: train_round(self.nodes[i], request.job, request.round, request.arrays)
                for i in ids}


# the synthetic X-rays of the bundle fixture (tests/federation/conftest.py)
SYNTHETIC = dict(n_train=900, n_val=150, n_test=300, seed=3)


def _job(**kw):
    base = dict(job_id="job-1", model="scatter-linear", rounds=3, local_epochs=1,
                batch_size=64, epsilon=3.0, secure_agg=False, normalize=False)
    return FederationConfig(**{**base, **kw})


def test_weighted_mean_is_examples_weighted():
    a = {"w": np.array([0.0, 2.0], dtype=np.float32), "n": np.array(5)}
    b = {"w": np.array([4.0, 4.0], dtype=np.float32), "n": np.array(7)}
    out = weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [3.0, 3.5])
    assert out["w"].dtype == np.float32 and int(out["n"]) == 7  # ints from the largest node


def test_bad_updates_are_excluded_with_a_reason():
    ref = {"w": np.zeros(3, dtype=np.float32)}
    assert check_update(NodeReply("ok", arrays={"w": np.zeros(4, np.float32)},
                                  num_examples=3), ref).startswith("parameter w has shape")
    assert "NaN" in check_update(NodeReply("ok", arrays={"w": np.array([0, np.nan, 0],
                                                                         np.float32)},
                                           num_examples=3), ref)
    assert check_update(NodeReply("ok", arrays={"v": np.zeros(3, np.float32)},
                                  num_examples=3), ref) == \
        "its weights have different parameter names"

    class Wrong:
        def train(self, ids, request, timeout):
            return {0: NodeReply("ok", "good", arrays={"w": np.ones(3, np.float32)},
                                 num_examples=2),
                    1: NodeReply("ok", "bad", arrays={"w": np.ones(5, np.float32)},
                                 num_examples=9)}

    outcome = PlainAggregator().run_round(Wrong(), [0, 1], RoundRequest(1, _job(), ref), 1.0)
    np.testing.assert_allclose(outcome.arrays["w"], np.ones(3))  # the bad node's 9 ignored
    assert outcome.replies[1].status == "error" and "excluded" in outcome.replies[1].reason


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_node_refuses_a_round_that_would_overspend(bundle, tmp_path):
    # Round 1 of a 3-round epsilon-3 plan costs about 1.9; composed, round 2 passes 2.5.
    node = site_nodes(bundle, tmp_path, budgets=(2.5,))[0]
    job = _job()
    arrays = state_to_arrays(create_model("scatter-linear", 1, 2, image_size=(28, 28)))
    first = train_round(node, job, 1, arrays)
    assert first.status == "ok", first.reason
    second = train_round(node, job, 2, first.arrays)
    assert second.status == "refused"
    assert "over its budget" in second.reason and second.arrays is None
    ledger = BudgetLedger(tmp_path / "site0.sqlite")
    assert [e["run_id"] for e in ledger.entries()] == ["job-1-round-1"]
    assert ledger.spent(node.bundle.train.dataset_id) <= 2.5


def test_repeated_round_is_replayed_not_charged_twice(bundle, tmp_path):
    node = site_nodes(bundle, tmp_path, budgets=(10.0,))[0]
    job = _job()
    arrays = state_to_arrays(create_model("scatter-linear", 1, 2, image_size=(28, 28)))
    first = train_round(node, job, 1, arrays)
    spent = BudgetLedger(tmp_path / "site0.sqlite").spent(node.bundle.train.dataset_id)
    again = train_round(node, job, 1, arrays)
    assert again.replayed and again.status == "ok"
    for key in first.arrays:
        np.testing.assert_array_equal(first.arrays[key], again.arrays[key])
    ledger = BudgetLedger(tmp_path / "site0.sqlite")
    assert len(ledger.entries()) == 1
    assert ledger.spent(node.bundle.train.dataset_id) == pytest.approx(spent)


def test_node_without_budget_refuses_no_dp_jobs_and_vice_versa(bundle, tmp_path):
    arrays = state_to_arrays(create_model("scatter-linear", 1, 2, image_size=(28, 28)))
    guarded = site_nodes(bundle, tmp_path, budgets=(5.0,))[0]
    reply = train_round(guarded, _job(dp="none"), 1, arrays)
    assert reply.status == "error" and "non-private" in reply.reason
    open_node = SiteNode(split_sites(bundle, 2)[0], name="open")
    assert train_round(open_node, _job(), 1, arrays).status == "error"  # DP needs a ledger
    assert train_round(open_node, _job(dp="none"), 1, arrays).status == "ok"


def test_mismatched_model_is_a_clear_error(bundle, tmp_path):
    node = site_nodes(bundle, tmp_path, budgets=(5.0,))[0]
    arrays = state_to_arrays(create_model("scatter-linear", 1, 3, image_size=(28, 28)))
    reply = train_round(node, _job(), 1, arrays)
    assert reply.status == "error" and "does not fit" in reply.reason


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_federation_improves_and_resumes_without_double_charge(bundle, tmp_path):
    nodes = site_nodes(bundle, tmp_path)
    job = _job(rounds=4)
    out = tmp_path / "run"
    untrained = create_model("scatter-linear", 1, 2, image_size=(28, 28))
    from privmed.training import evaluate
    base_auc = evaluate(untrained, bundle.test)["roc_auc"]

    with pytest.raises(RuntimeError, match="crashed"):
        run_federation(DirectTransport(nodes, fail_at=3), job, bundle.test, out, log=lambda s: None)
    assert (out / "checkpoint.pt").exists() and not (out / "results.json").exists()
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2

    # The coordinator forgets round 2 was done (as if it crashed before checkpointing it):
    # the nodes answer round 2 from their stored replies.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    rounds = json.loads(ckpt["rounds"])[:1]
    ckpt.update(round=1, rounds=json.dumps(rounds))
    torch.save(ckpt, out / "checkpoint.pt")

    transport = DirectTransport(nodes)
    results = run_federation(transport, job, bundle.test, out, resume=True, log=lambda s: None)
    assert transport.calls == [2, 3, 4]
    fed = results["federation"]
    assert [r["round"] for r in fed["rounds"]] == [1, 2, 3, 4]
    assert all(n["replayed"] for n in fed["rounds"][1]["nodes"])
    assert results["metrics"]["test"]["roc_auc"] > base_auc + 0.1
    for i, _node in enumerate(nodes):
        entries = BudgetLedger(tmp_path / f"site{i}.sqlite").entries()
        assert sorted(e["run_id"] for e in entries) == [f"job-1-round-{r}" for r in (1, 2, 3, 4)]
    # privacy.epsilon is the largest node's, each node's listed, all within the target
    per_node = results["privacy"]["per_node"]
    assert len(per_node) == 3
    assert results["privacy"]["epsilon"] == max(p["epsilon"] for p in per_node)
    assert results["privacy"]["epsilon"] <= job.epsilon * 1.01
    assert (out / "report.html").exists() and "Federation" in (out / "report.html").read_text()
