"""Attacks from an adversarial review of the one-time-key protocol, mounted against the
real classes: stored vectors replayed over different survivors, releases that escaped
the ledger, stored shares sent in the clear, honest nodes framed by colluders,
malformed or malicious replies, refusal sentences that carry figures, and job ids that
share a prefix. Each test fails if the attack still works."""

from __future__ import annotations

import numpy as np
import pytest
from federation_kit import (
    FakeNode,
    FastTransport,
    Wiretap,
    attack_job,
    fast_request,
    key_setup,
    round_request,
    site_nodes,
)

from privmed.errors import BudgetExceededError
from privmed.federation import InProcessTransport
from privmed.federation.coordinator.secure import SecureAggregator
from privmed.federation.messages import (
    ENCODING,
    pack,
    stats_request,
    unpack,
    vector_length,
)
from privmed.federation.secagg.protocol import RecoveryError
from privmed.privacy import BudgetLedger

# the synthetic X-rays of the bundle fixture (tests/federation/conftest.py)
SYNTHETIC = dict(n_train=800, n_val=100, n_test=100, seed=11)


def _length(request):
    return vector_length(request.arrays, request.trainable)


def _ledger(tmp_path, site):
    return {e["run_id"]: e["status"] for e in BudgetLedger(tmp_path / f"site{site}.sqlite")
            .entries()}


def _quiet():
    return SecureAggregator("atk", log=lambda s: None)


def test_a_stored_vector_is_never_unmasked_over_two_survivor_sets(bundle, tmp_path):
    """Round 1 is unmasked over all four sites; a rerun (or resume) of the same job with
    site 3 offline replayed the other three stored vectors: the difference of the two
    sums was site 3's distributed-DP share, with 1/sqrt(3) of its noise."""
    nodes = site_nodes(bundle, tmp_path, 4, first_id=3000)
    ids = sorted(nodes)
    request = round_request(attack_job(rounds=1), 1)
    every, _, _ = _quiet()._secure_sum(InProcessTransport(nodes), ids, request,
                                    _length(request), 60)
    assert every is not None
    three = {n: nodes[n] for n in ids[:3]}
    again, replies, _ = _quiet()._secure_sum(InProcessTransport(three), ids[:3], request,
                                          _length(request), 60)
    assert again is None  # no second sum, so no difference
    # the same survivors may see the same sum again (nothing new is revealed)
    same, _, _ = _quiet()._secure_sum(InProcessTransport(nodes), ids, request, _length(request),
                                   60)
    np.testing.assert_array_equal(same, every)


def test_a_vector_that_left_its_node_is_charged_even_if_it_misses_the_unmasking(
        bundle, tmp_path):
    """Site 3 sends its masked share, then misses the unmasking request: the sum still
    holds it (its peers reveal its self mask), so its ledger must keep the charge."""
    nodes = site_nodes(bundle, tmp_path, 4, first_id=3000)
    ids = sorted(nodes)
    job = attack_job(rounds=2)
    tap = Wiretap(nodes, lambda kind, node, r, call: kind == "secagg-unmask" and node == ids[3]
                  and r == 1)
    agg = _quiet()
    first, second = round_request(job, 1), round_request(job, 2)
    total, _, _ = agg._secure_sum(tap, ids, first, _length(first), 60)
    assert total is not None and round(float(total[-1]) * 1000) == 4 * 64  # site 3 is in it
    assert agg._secure_sum(tap, ids, second, _length(second), 60)[0] is not None
    assert _ledger(tmp_path, 3)["atk-round-1"] == "committed"  # not given back in round 2


def test_a_given_back_reservation_is_charged_again_before_it_leaves(bundle, tmp_path):
    node = next(iter(site_nodes(bundle, tmp_path, 2, first_id=3000).values()))
    job = attack_job()
    node.reserve(job, 1, [(1.0, 0.1, 1)])
    node.release_discarded(job, before_round=2)  # computed, never sent: given back
    assert _ledger(tmp_path, 0)["atk-round-1"] == "released"
    node.charge_release("atk", 1)  # a later run sends it after all
    assert _ledger(tmp_path, 0)["atk-round-1"] == "committed"
    # and one the budget no longer covers is refused, so it is never sent
    node.reserve(job, 2, [(1.0, 0.1, 1)])
    node.release_discarded(job, before_round=3)
    ledger = BudgetLedger(tmp_path / "site0.sqlite")
    dataset = node.bundle.train.dataset_id
    node.budget_epsilon = ledger.spent(dataset)  # the operator lowers the budget
    ledger.set_budget(dataset, node.budget_epsilon, node.delta(job), "prv")
    with pytest.raises(BudgetExceededError):
        node.charge_release("atk", 2)
    assert _ledger(tmp_path, 0)["atk-round-2"] == "released"


@pytest.mark.slow  # in-process, but long: make test-fast leaves it out
def test_a_secure_share_is_never_sent_in_the_clear(bundle, tmp_path):
    """After a secure distributed job, the same job id run with --no-secure-agg made every
    node send its stored share (1/sqrt(t) of the noise) and noisy statistics in the
    clear, with sigma, q and its exact image count."""
    nodes = site_nodes(bundle, tmp_path, 3, first_id=3000)
    ids = sorted(nodes)
    job = attack_job(rounds=1, normalize=True)
    transport = InProcessTransport(nodes)
    agg = _quiet()
    assert agg.statistics(transport, ids, job, 1, 60) is not None
    request = round_request(job, 1)
    assert agg._secure_sum(transport, ids, request, _length(request), 60)[0] is not None
    # the same job id with --no-secure-agg, and the same job asked without masking
    plain = attack_job(rounds=1, normalize=True, secure_agg=False, dp="local")
    for ask in (plain, job):
        for reply in [*transport.train(ids, stats_request(ask), 60).values(),
                      *transport.train(ids, round_request(ask, 1), 60).values()]:
            assert reply.status == "error" and reply.arrays is None
            assert ("for other settings" if ask is plain else "will not send it in the clear"
                    ) in reply.reason


def test_colluders_cannot_frame_an_honest_node_or_subtract_it(bundle, tmp_path):
    """Two colluders (t - 1 of 4) report corrupted shares of node 3's self mask while
    giving the coordinator their true ones: node 3 was blamed and excluded, and the retry
    without it gave the coordinator node 3's vector as the difference of the two sums."""
    nodes = site_nodes(bundle, tmp_path, 4, first_id=3000)
    ids = sorted(nodes)
    victim = ids[2]

    def lie(meta):
        msg = unpack(meta)
        if msg.get("status") == "ok" and victim in msg["b"]:
            x, y, r = msg["b"][victim]
            msg["b"][victim] = (x, y + 7919, r)
        return pack(msg)

    rewrite = {("secagg-unmask", ids[0]): lie, ("secagg-unmask", ids[1]): lie}
    tap = Wiretap(nodes, lambda kind, node, r, call: kind == "train" and node == victim
                  and call >= 2, rewrite)
    logs: list[str] = []
    agg = SecureAggregator("atk", log=logs.append)
    request = round_request(attack_job(rounds=1), 1)
    assert agg._secure_sum(tap, ids, request, _length(request), 60)[0] is None
    assert victim not in agg.excluded  # not framed: only the lying shares were left out
    # The victim then times out: a sum over the other three would expose it as the
    # difference. The honest node that revealed the first attempt refuses, and the
    # colluders alone (t - 1) cannot unmask.
    assert agg._secure_sum(tap, ids, request, _length(request), 60)[0] is None
    assert any(f"node {ids[3]} secagg-unmask" in line and "other survivors" in line
               for line in logs)


def test_one_dishonest_holder_among_many_excludes_no_one():
    """With 16 nodes (t = 11) one node corrupting every share it reveals made the old
    subset search give up and exclude honest nodes."""
    params, nodes, server = key_setup(n=16, t=11, instances=2)
    instance, active = server.begin(), server.active()
    values = {i: np.full(20, 0.25) for i in nodes}
    inputs = {i: nodes[i].masked_input(instance, active, values[i]) for i in active}
    survivors, dropped, _ = server.collect(active, inputs, 20)
    routed = server.route({i: inputs[i]["b_shares"] for i in survivors})
    replies = {j: nodes[j].unmask(instance, survivors, dropped, routed[j]) for j in survivors}
    replies[1]["b"] = {o: (x, y + 1, r) for o, (x, y, r) in replies[1]["b"].items()}
    total = server.unmask(instance, inputs, survivors, dropped, replies, 20)
    np.testing.assert_allclose(total, 4.0, atol=16 * params.encoding.quantum)
    assert server.faulty == {} and len(server.inconsistent) == 16


def _secure_fed(hooks):
    nodes = {i: FakeNode(f"site-{i}", np.full(6, 0.5)) for i in range(1, 5)}
    logs: list[str] = []
    agg = SecureAggregator("j", log=logs.append)
    transport = FastTransport(nodes, hooks={4: hooks})
    outcomes = [agg._secure_sum(transport, sorted(nodes), fast_request(1), 6, 60)[0]
                for _ in range(2)]
    return outcomes, agg, logs


def _set(key, value):
    def hook(meta):
        msg = unpack(meta)
        msg[key] = value
        return pack(msg)
    return hook


def _train_secure(value):
    def hook(reply):
        reply.secure = value
        return reply
    return hook


@pytest.mark.parametrize("hooks", [
    {"train": _train_secure("x")},
    {"train": _train_secure({"b_shares": {1: "no"}, "b_commit": 3})},
    {"secagg-unmask": _set("b", [1, 2])},
    {"secagg-unmask": _set("s", "zz")},
    {"secagg-unmask": _set("bad", "everyone")},
    {"secagg-unmask": lambda meta: "{not json"},
    {"secagg-unmask": lambda meta: "[1, 2]"},
    {"secagg-unmask": lambda meta: '{"status": "ok", "b": ' + "9" * 5000 + "}"},
    {"secagg-unmask": lambda meta: '{"status": "ok", "b": {"__i": [["x", 1]]}}'},
    {"secagg-keys": _set("commits", "x")},
    {"secagg-shares": _set("bad", {"x": 1})},
], ids=["secure-string", "secure-junk", "b-list", "s-string", "bad-string", "not-json",
        "json-list", "huge-int", "bad-int-key", "commits-junk", "bad-junk"])
def test_a_malformed_reply_never_stops_the_coordinator(hooks):
    outcomes, _, _ = _secure_fed(hooks)
    # the sum with or without the broken node, or a round that fails loudly; never an
    # exception, never a wrong sum, and the job goes on
    for total in outcomes:
        assert total is None or any(np.allclose(total, v, atol=4 * ENCODING.quantum)
                                    for v in (1.5, 2.0))
    assert outcomes[-1] is not None


def _low_order_key(meta):
    msg = unpack(meta)
    msg["advert"]["c_pk"] = bytes(32)
    return pack(msg)


def _garbage_key_shares(meta):
    msg = unpack(meta)
    msg["shares"] = {p: b"\0" * 60 for p in msg["shares"]}
    return pack(msg)


def _garbage_self_mask_shares(reply):
    reply.secure = {**reply.secure, "b_shares": {p: b"\0" * 40 if p != 4 else v
                                                 for p, v in reply.secure["b_shares"].items()}}
    return reply


@pytest.mark.parametrize("hooks", [{"secagg-advertise": _low_order_key},
                                   {"secagg-keys": _garbage_key_shares},
                                   {"train": _garbage_self_mask_shares}],
                         ids=["low-order-key", "garbage-key-shares", "garbage-mask-shares"])
def test_a_node_that_breaks_setup_or_its_shares_is_left_out_and_the_rest_go_on(hooks):
    """One node could make every key setup or every round fail, for ever."""
    outcomes, agg, logs = _secure_fed(hooks)
    assert outcomes[-1] is not None
    np.testing.assert_allclose(outcomes[-1], 1.5, atol=4 * ENCODING.quantum)


def test_refusal_sentences_carry_no_figure_of_a_nodes_data(bundle, tmp_path):
    """A job with --delta 0.5 made every node answer 'Delta 0.5 is not below 1/N for
    this node's 134 images.'"""
    nodes = site_nodes(bundle, tmp_path, 3, first_id=3000)
    ids = sorted(nodes)
    request = round_request(attack_job(rounds=1, delta=0.5), 1)
    total, replies, _ = _quiet()._secure_sum(InProcessTransport(nodes), ids, request,
                                          _length(request), 60)
    assert total is None
    for n, reply in replies.items():
        assert str(nodes[n].num_examples) not in reply.reason
        assert reply.status == "error"


def test_job_ids_that_share_a_prefix_keep_their_own_ledger_entries(bundle, tmp_path):
    node = next(iter(site_nodes(bundle, tmp_path, 2, first_id=3000).values()))
    other, job = attack_job(job_id="a-b", normalize=True), attack_job(job_id="a")
    node.reserve(other, 3, [(1.0, 0.1, 1)])
    node.reserve(other, 0, [(20.0, 1.0, 1)])
    node.release_discarded(job, before_round=5)  # job a's housekeeping
    assert _ledger(tmp_path, 0) == {"a-b-round-3": "reserved", "a-b-stats": "reserved"}
    assert node.released_rounds(job) == 0


def test_an_unrecoverable_node_is_not_excluded_without_proof():
    """Too few good shares is a failed round, not a verdict on the node."""
    _, nodes, server = key_setup(n=4, t=3, instances=2)
    instance, active = server.begin(), server.active()
    inputs = {i: nodes[i].masked_input(instance, active, np.zeros(5)) for i in active}
    survivors, dropped, _ = server.collect(active, inputs, 5)
    routed = server.route({i: inputs[i]["b_shares"] for i in survivors})
    replies = {j: nodes[j].unmask(instance, survivors, dropped, routed[j])
               for j in survivors[:3]}
    replies[1]["b"].pop(2)
    with pytest.raises(RecoveryError, match="Too few good shares"):
        server.unmask(instance, inputs, survivors, dropped, replies, 5)
    assert server.faulty == {}
