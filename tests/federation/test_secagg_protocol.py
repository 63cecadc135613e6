"""The secure-aggregation protocol end to end in one process: real keys, real AES-GCM,
real Shamir shares; dropouts at each stage; what the coordinator can and cannot do."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from federation_kit import key_setup
from scipy import stats

from privmed.federation.secagg.protocol import (
    Params,
    ProtocolError,
    RecoveryError,
    SecAggNode,
)

LENGTH = 300


_setup = key_setup


def _round(server, nodes, updates, *, silent=(), gone_before_unmask=()):
    instance, active = server.begin(), server.active()
    inputs = {i: nodes[i].masked_input(instance, active, updates[i])
              for i in active if i not in silent}
    survivors, dropped, reasons = server.collect(active, inputs, LENGTH)
    routed = server.route({i: inputs[i]["b_shares"] for i in survivors})
    replies = {j: nodes[j].unmask(instance, survivors, dropped, routed[j])
               for j in survivors if j not in gone_before_unmask}
    return server.unmask(instance, inputs, survivors, dropped, replies, LENGTH), survivors, \
        reasons


def _updates(nodes, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, LENGTH) for i in nodes}


def _close(total, expected, parties, params):
    return np.max(np.abs(total - expected)) <= parties * params.encoding.quantum + 1e-12


def test_sum_equals_plain_sum_within_quantisation_bound():
    params, nodes, server = _setup()
    updates = _updates(nodes)
    total, survivors, _ = _round(server, nodes, updates)
    assert survivors == [1, 2, 3, 4, 5]
    assert _close(total, sum(updates.values()), 5, params)


def test_node_silent_after_key_setup_is_recovered():
    params, nodes, server = _setup()
    updates = _updates(nodes, 1)
    total, survivors, reasons = _round(server, nodes, updates, silent={4})
    assert survivors == [1, 2, 3, 5] and "no masked input" in reasons[4]
    expected = sum(updates[i] for i in survivors)
    assert _close(total, expected, 4, params)
    assert 4 not in server.active()  # not asked again in this key setup (saves a timeout)
    total2, survivors2, _ = _round(server, nodes, updates)  # next round goes on
    assert survivors2 == [1, 2, 3, 5] and _close(total2, expected, 4, params)


def test_node_gone_after_sending_its_input_is_still_counted():
    params, nodes, server = _setup()
    updates = _updates(nodes, 2)
    total, _, _ = _round(server, nodes, updates, gone_before_unmask={2, 5})
    assert _close(total, sum(updates.values()), 5, params)


def test_round_with_too_few_unmasking_replies_fails_loudly():
    _, nodes, server = _setup(n=5, t=3)
    with pytest.raises(RecoveryError, match="discarded"):
        _round(server, nodes, _updates(nodes), gone_before_unmask={1, 2, 3})


def test_malformed_or_wrong_length_input_is_excluded_with_a_reason():
    params, nodes, server = _setup()
    updates = _updates(nodes, 3)
    instance, active = server.begin(), server.active()
    inputs = {i: nodes[i].masked_input(instance, active, updates[i]) for i in active}
    inputs[3]["y"] = inputs[3]["y"][:-1]  # wrong length
    inputs[5]["y"] = inputs[5]["y"].astype(np.float64)  # wrong type
    survivors, dropped, reasons = server.collect(active, inputs, LENGTH)
    assert survivors == [1, 2, 4] and dropped == [3, 5]
    assert "wrong-length" in reasons[3] and "malformed" in reasons[5]
    routed = server.route({i: inputs[i]["b_shares"] for i in survivors})
    replies = {j: nodes[j].unmask(instance, survivors, dropped, routed[j]) for j in survivors}
    total = server.unmask(instance, inputs, survivors, dropped, replies, LENGTH)
    assert _close(total, sum(updates[i] for i in survivors), 3, params)


def test_coordinators_view_of_one_update_is_uniform():
    _, nodes, server = _setup()
    instance, active = server.begin(), server.active()
    constant = np.full(LENGTH * 40, 0.25)  # maximally structured input
    y = nodes[1].masked_input(instance, active, constant)["y"]
    u = y.astype(np.float64) / 2 ** 48
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # and its low bits carry no trace of the constant either
    assert stats.chisquare(np.bincount((y & np.uint64(255)).astype(np.int64),
                                       minlength=256)).pvalue > 1e-3


def test_nodes_refuse_to_reveal_both_shares_of_one_peer():
    _, nodes, server = _setup()
    updates = _updates(nodes)
    instance, active = server.begin(), server.active()
    inputs = {i: nodes[i].masked_input(instance, active, updates[i]) for i in active}
    routed = server.route({i: inputs[i]["b_shares"] for i in active})
    nodes[1].unmask(instance, active, [], routed[1])
    # A curious coordinator now claims node 2 dropped to learn its mask key too.
    others = [i for i in active if i != 2]
    with pytest.raises(ProtocolError, match="already revealed"):
        nodes[1].unmask(instance, others, [2], {i: routed[1][i] for i in others})


def test_a_mask_key_masks_one_vector_only():
    _, nodes, server = _setup()
    active = server.active()
    nodes[1].masked_input(0, active, np.zeros(LENGTH))
    with pytest.raises(ProtocolError, match="used"):
        nodes[1].masked_input(0, active, np.ones(LENGTH))


def test_tampered_share_is_rejected():
    _, nodes, server = _setup()
    instance, active = server.begin(), server.active()
    inputs = {i: nodes[i].masked_input(instance, active, np.zeros(LENGTH)) for i in active}
    routed = server.route({i: inputs[i]["b_shares"] for i in active})
    blob = bytearray(routed[1][2])
    blob[-1] ^= 1
    routed[1][2] = bytes(blob)
    out = nodes[1].unmask(instance, active, [], routed[1])  # reported, the rest answered
    assert out["bad"] == [2] and 2 not in out["b"] and set(out["b"]) == set(active) - {2}


def test_node_restored_from_its_state_carries_on_between_rounds():
    # simulation keeps a node's protocol state in Flower's Context.state between messages
    from privmed.federation.messages import pack, unpack

    params, nodes, server = _setup()
    updates = _updates(nodes)
    _round(server, nodes, updates, silent=(5,))
    nodes = {i: SecAggNode.from_state(unpack(pack(n.to_state())), params.encoding)
             for i, n in nodes.items()}
    total, survivors, _ = _round(server, nodes, updates)
    assert survivors == [1, 2, 3, 4]
    assert _close(total, sum(updates[i] for i in survivors), 4, params)
    # what a node refused before a restore, it still refuses after it
    with pytest.raises(ProtocolError, match="used"):
        nodes[1].masked_input(0, [1, 2, 3, 4], updates[1])


def test_nodes_refuse_a_threshold_below_a_majority_and_an_oversized_roster():
    params = Params(run_id=secrets.token_bytes(16), threshold=2, instances=2)
    nodes = {i: SecAggNode(i, params) for i in range(1, 5)}
    roster = {i: n.advertise() for i, n in nodes.items()}
    with pytest.raises(ProtocolError, match="not a majority"):
        nodes[1].share_keys(roster, threshold=2)  # 2 of 4: two disjoint pairs could unmask
    with pytest.raises(ProtocolError, match="at most 3 sites"):
        nodes[2].share_keys(roster, threshold=3, max_roster=3)
    assert nodes[3].share_keys(roster, threshold=3, max_roster=4)  # a majority is fine
