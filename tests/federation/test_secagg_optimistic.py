"""Optimistic secure rounds (no self masks, no unmasking exchange), attacked as the
coordinator would: every vector arrives and the sum is exact with one exchange; a claimed
dropout opens nothing (the nodes never reveal a share of such an instance); a retry over a
smaller set, which would give one node's vector as the difference of two sums, is refused;
a real dropout loses that round only, and later rounds add self masks and survive."""

from __future__ import annotations

import numpy as np
import pytest
from federation_kit import Wiretap, attack_job, key_setup, round_request, site_nodes

from privmed.federation import InProcessTransport, run_federation
from privmed.federation.coordinator.secure import SecureAggregator
from privmed.federation.messages import pack, unpack, vector_length
from privmed.federation.node.handler import handle_request
from privmed.federation.secagg.protocol import ProtocolError, RecoveryError

# the synthetic X-rays of the bundle fixture (tests/federation/conftest.py)
SYNTHETIC = dict(n_train=600, n_val=60, n_test=100, seed=13)


def _length(request):
    return vector_length(request.arrays, request.trainable)


def _kinds(tap, round_no):
    return [kind for kind, r, _ in tap.sent if r == round_no]


def test_an_optimistic_sum_is_exact_and_needs_no_unmasking():
    params, nodes, server = key_setup(n=4, t=3)
    rng = np.random.default_rng(0)
    vectors = {i: rng.uniform(-1, 1, 20) for i in nodes}
    instance, active = server.begin(), server.active()
    inputs = {i: nodes[i].masked_input(instance, active, vectors[i], self_mask=False)
              for i in active}
    assert all(set(m) == {"y"} for m in inputs.values())  # no self mask, no shares
    total = server.sum_without_unmasking(active, inputs, 20)
    np.testing.assert_allclose(total, sum(vectors.values()),
                               atol=4 * params.encoding.quantum)
    # one vector alone is uniform noise in the ring, not the update
    alone = params.encoding.decode(inputs[active[0]]["y"])
    assert np.abs(alone - vectors[active[0]]).max() > 1.0


def test_a_claimed_dropout_opens_no_vector_of_an_optimistic_instance():
    """The coordinator holds every masked vector, then says node 4 dropped and asks the
    others for shares of node 4's mask key: with them it would strip node 4's pairwise
    masks and read its vector. Every node refuses for an instance without self masks."""
    params, nodes, server = key_setup(n=4, t=3)
    instance, active = server.begin(), server.active()
    for i in active:
        nodes[i].masked_input(instance, active, np.ones(5), self_mask=False)
    for i in active[:3]:
        with pytest.raises(ProtocolError, match="without self masks"):
            nodes[i].unmask(instance, active[:3], active[3:], {})
    # a node whose vector went missing makes the whole sum unrecoverable, not partial
    inputs = {i: {"y": np.zeros(5, dtype=np.uint64)} for i in active[:3]}
    with pytest.raises(RecoveryError, match="without self masks"):
        server.sum_without_unmasking(active, inputs, 5)


def test_a_retry_over_fewer_nodes_cannot_subtract_one_vector(bundle, tmp_path):
    """Round 1 is summed optimistically over all four sites; the coordinator then retries
    it with site 3 left out. The three others would replay their stored vectors, and the
    two sums' difference would be site 3's distributed-DP share. Each stored vector is
    bound to the set it was first summed with, so the retry yields no sum."""
    nodes = site_nodes(bundle, tmp_path, 4, first_id=3000)
    ids = sorted(nodes)
    request = round_request(attack_job(rounds=1), 1)
    first = SecureAggregator("atk", log=lambda s: None, optimistic=True)
    tap = Wiretap(nodes)
    every, _, _ = first._secure_sum(tap, ids, request, _length(request), 60)
    assert every is not None
    assert "secagg-unmask" not in _kinds(tap, 1)  # one exchange: the masked vectors
    three = {n: nodes[n] for n in ids[:3]}
    for optimistic in (True, False):
        again = SecureAggregator("atk", log=lambda s: None, optimistic=optimistic)
        total, replies, _ = again._secure_sum(InProcessTransport(three), ids[:3], request,
                                              _length(request), 60)
        assert total is None
        assert all(r.status != "ok" for r in replies.values())


def test_a_node_never_masks_a_vector_optimistically_with_a_new_set(bundle, tmp_path):
    """The other order: round 1 is unmasked (with self masks) over three sites, then the
    coordinator asks for it optimistically over all four."""
    nodes = site_nodes(bundle, tmp_path, 4, first_id=3000)
    ids = sorted(nodes)
    request = round_request(attack_job(rounds=1), 1)
    three = {n: nodes[n] for n in ids[:3]}
    full = SecureAggregator("atk", log=lambda s: None)
    assert full._secure_sum(InProcessTransport(three), ids[:3], request, _length(request),
                            60)[0] is not None
    later = SecureAggregator("atk", log=lambda s: None, optimistic=True)
    total, replies, _ = later._secure_sum(InProcessTransport(nodes), ids, request,
                                          _length(request), 60)
    assert total is None
    assert {replies[n].status for n in ids[:3]} == {"error"}


def test_an_unmasking_request_for_an_optimistic_round_is_refused_by_real_nodes(bundle,
                                                                              tmp_path):
    nodes = site_nodes(bundle, tmp_path, 3, first_id=3000)
    ids = sorted(nodes)
    request = round_request(attack_job(rounds=1), 1)
    agg = SecureAggregator("atk", log=lambda s: None, optimistic=True)
    tap = Wiretap(nodes)
    assert agg._secure_sum(tap, ids, request, _length(request), 60)[0] is not None
    instance = next(r[2] for r in tap.replies if r[0] == "train")
    for n in ids[:2]:
        meta = handle_request(nodes[n], {"kind": "secagg-unmask", "round": 1, "payload": pack(
            {"job_id": "atk", "instance": instance, "survivors": ids[:2],
             "dropped": ids[2:], "b_shares": {}})})["meta"]
        reply = unpack(meta)
        assert reply["status"] == "error" and "without self masks" in reply["reason"]
        assert "s" not in reply


def test_a_dropout_loses_one_optimistic_round_and_later_rounds_survive_dropouts(bundle,
                                                                               tmp_path):
    """site-3 dies in round 2: that optimistic round is lost (not retried: its vectors are
    bound to the four), round 3 adds self masks and is unmasked without site-3."""
    nodes = site_nodes(bundle, tmp_path, 4, first_id=3000)
    ids = sorted(nodes)
    job = attack_job(rounds=3, dp="local", local_epochs=1)
    assert job.secagg_optimistic  # the default
    tap = Wiretap(nodes, lambda kind, node, r, call: node == ids[3] and r >= 2)
    results = run_federation(tap, job, bundle.test, tmp_path / "run", log=lambda s: None)
    status = [r["status"] for r in results["federation"]["rounds"]]
    assert status == ["ok", "failed", "ok"]
    assert "secagg-unmask" not in _kinds(tap, 1)  # round 1: every vector arrived
    assert "secagg-unmask" not in _kinds(tap, 2)  # lost: nothing to unmask, no retry
    assert _kinds(tap, 2).count("train") == 1
    assert "secagg-unmask" in _kinds(tap, 3)  # self masks from then on
    third = {n["node"]: n["status"] for n in results["federation"]["rounds"][2]["nodes"]}
    assert {k: v for k, v in third.items() if v == "ok"} == {
        "site-0": "ok", "site-1": "ok", "site-2": "ok"}
