"""Secure aggregation at the coordinator: the :class:`Aggregator` that sees only sums.

It agrees one-time mask keys with the nodes (``secagg.protocol``), runs each round as one
masked sum plus one unmasking exchange over the federation's Transport, and hands the
unmasked sum to its strategy (``coordinator.strategies``): FedAvg weighted by examples
(``--dp local``) or one server-optimiser step on the noisy gradient sum
(``--dp distributed``). The nodes' side is ``node.handler``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import replace
from typing import Any

import numpy as np

from privmed.federation.coordinator.strategies import Strategy, WrapsStrategy
from privmed.federation.messages import (
    ENCODING,
    NodeReply,
    RoundOutcome,
    RoundRequest,
    Transport,
    pack,
    statistics_from_sum,
    stats_length,
    stats_request,
    unpack,
    vector_length,
)
from privmed.federation.secagg.protocol import (
    MAX_INSTANCES,
    Params,
    RecoveryError,
    SecAggServer,
)


class SecureAggregator(WrapsStrategy):
    """Aggregator that sees only the sum of the nodes' weighted updates; a resumed job
    keeps its strategy's state (the keys are set up anew)."""

    name = "secagg"
    secure = True

    def __init__(self, job_id: str, threshold_fraction: float = 2 / 3,
                 strategy: Strategy | None = None, log: Any = print, *,
                 optimistic: bool = False) -> None:
        from privmed.federation.coordinator.strategies import FedAvg

        self.job_id, self.fraction, self.log = job_id, threshold_fraction, log
        self.strategy = strategy or FedAvg()
        # Training rounds masked without self masks (no unmasking exchange) until one is
        # lost to a missing vector; from then on every round adds them and survives
        # dropouts. The statistics always add them: a lost statistics phase ends the job.
        self.optimistic = optimistic
        self.server: SecAggServer | None = None
        self.excluded: set[int] = set()  # nodes proven faulty: never asked again

    def _ask(self, transport: Transport, kind: str, payloads: dict[int, dict], round_no: int,
             timeout: float) -> dict[int, dict]:
        replies = transport.exchange(kind, {n: pack({**p, "job_id": self.job_id})
                                            for n, p in payloads.items()}, round_no, timeout)
        out = {}
        for node, (meta, _) in replies.items():
            try:  # a node's reply is untrusted input: anything malformed is no answer
                msg = unpack(meta) if meta else {"status": "error", "reason": "no reply"}
            except (ValueError, TypeError, AttributeError, RecursionError):
                msg = None
            if not isinstance(msg, dict):
                msg = {"status": "error", "reason": "a malformed reply"}
            if msg.get("status") == "ok":
                out[node] = msg
            else:
                self.log(f"Secure aggregation: node {node} {kind}: {msg.get('reason')}")
        return out

    def threshold(self, nodes: int) -> int:
        """The configured fraction of the nodes, never below a strict majority (nodes
        refuse less) nor below 2."""
        return max(2, nodes // 2 + 1, math.ceil(self.fraction * nodes - 1e-9))

    def _setup(self, transport: Transport, node_ids: list[int], instances: int,
               timeout: float) -> SecAggServer:
        run_id = secrets.token_bytes(16)
        candidates = [n for n in node_ids if n not in self.excluded]
        adverts = self._ask(transport, "secagg-advertise", {
            n: {"run_id": run_id, "node_id": n, "instances": instances}
            for n in candidates}, 0, timeout)
        # The threshold follows the nodes that actually answered, not those listed.
        threshold = self.threshold(len(adverts))
        server = SecAggServer(Params(run_id=run_id, threshold=threshold, encoding=ENCODING,
                                     instances=instances))
        roster = server.make_roster({n: m.get("advert") for n, m in adverts.items()})
        dealt = self._ask(transport, "secagg-keys", {
            n: {"roster": roster, "threshold": threshold} for n in roster}, 0, timeout)
        dealt = {n: (m.get("shares"), m.get("commits")) for n, m in dealt.items()
                 if isinstance(m.get("shares"), dict)
                 and all(isinstance(b, bytes) for b in m["shares"].values())}
        inbox = server.route({n: blobs for n, (blobs, _) in dealt.items()})
        done = self._ask(transport, "secagg-shares", {n: {"shares": inbox.get(n, {})}
                                                      for n in dealt}, 0, timeout)
        reports = {n: [d for d in m.get("bad", []) if isinstance(d, int)]
                   if isinstance(m.get("bad"), list) else list(dealt) for n, m in done.items()}
        for holder, bad in reports.items():
            for dealer in bad:
                self.log(f"Secure aggregation: node {holder} could not open node {dealer}'s "
                         "key shares.")
        server.accept_key_shares(dealt, reports)
        self.log(f"Secure aggregation set up with {len(server.roster)} nodes, threshold "
                 f"{threshold}, {instances} one-time mask keys.")
        return server

    def _secure_sum(self, transport: Transport, node_ids: list[int], request: RoundRequest,
                    length: int, timeout: float
                    ) -> tuple[np.ndarray | None, dict[int, NodeReply], bool]:
        """The unmasked sum of the active nodes' vectors for ``request`` (None when the
        round cannot be recovered), each node's reply, and whether trying the round again
        may succeed (not for a lost optimistic round: its vectors are bound to its set)."""
        replies: dict[int, NodeReply] = {}
        optimistic = self.optimistic and request.phase == "train"
        try:
            if self.server is None or self.server.exhausted:
                rounds_left = request.job.rounds - request.round + 2
                self.server = self._setup(transport, node_ids,
                                          max(1, min(MAX_INSTANCES, rounds_left)), timeout)
            server = self.server
            instance, active = server.begin(), server.active()
            replies = transport.train(active, replace(request, active=active, instance=instance,
                                                      self_mask=not optimistic), timeout)
            inputs: dict[int, dict] = {}
            for node, reply in replies.items():
                y = (reply.arrays or {}).get("y") if isinstance(reply.arrays, dict) else None
                if y is not None and isinstance(reply.secure, dict):
                    inputs[node] = {**reply.secure, "y": np.asarray(y)}
            if optimistic:
                try:
                    return server.sum_without_unmasking(active, inputs, length), replies, False
                except RecoveryError:
                    self.optimistic = False
                    self.log(f"Round {request.round}: a node's vector is missing, and a round "
                             "masked without self masks cannot be unmasked without it; the "
                             "round is lost and later rounds add self masks.")
                    raise
            survivors, dropped, reasons = server.collect(active, inputs, length)
            for node, why in reasons.items():
                if node in replies and replies[node].status == "ok":
                    replies[node] = _failed(replies[node], f"excluded: {why}")
            routed = server.route({n: inputs[n]["b_shares"] for n in survivors})
            unmask = self._ask(transport, "secagg-unmask", {
                n: {"instance": instance, "survivors": survivors, "dropped": dropped,
                    "b_shares": routed[n]} for n in survivors}, request.round, timeout)
            try:
                total = server.unmask(instance, inputs, survivors, dropped, unmask, length)
            finally:
                self._report_faults(server, replies)
        except RecoveryError as exc:
            # Keys are one-time, so nothing revealed here helps later; the next attempt
            # agrees fresh keys with whichever nodes are connected then (an optimistic
            # round revealed nothing at all: its key setup serves the next round).
            if not optimistic:
                self.server = None
            self.log(f"Round {request.round}: {exc}")
            for node, reply in replies.items():
                if reply.status == "ok":
                    replies[node] = _failed(reply, str(exc))
            return None, replies, not optimistic
        return total, replies, True

    def _report_faults(self, server: SecAggServer, replies: dict[int, NodeReply]) -> None:
        for line in server.inconsistent:
            self.log(f"Secure aggregation: {line}; it was left out.")
        server.inconsistent.clear()
        for node, why in server.faulty.items():
            if node not in self.excluded:
                self.log(f"Secure aggregation: node {node} excluded from the job: {why}.")
                self.excluded.add(node)
            if node in replies:
                replies[node] = _failed(replies[node], f"excluded: {why}")

    def statistics(self, transport: Transport, node_ids: list[int], job: Any, channels: int,
                   timeout: float) -> tuple[list[float], list[float]] | None:
        """Pixel mean and std per channel over all sites, through the secure sum."""
        total, _, _ = self._secure_sum(transport, node_ids, stats_request(job),
                                       stats_length(channels), timeout)
        return None if total is None else statistics_from_sum(total, channels)

    def run_round(self, transport: Transport, node_ids: list[int], request: RoundRequest,
                  timeout: float) -> RoundOutcome:
        length = vector_length(request.arrays, request.trainable)
        total, replies, retryable = self._secure_sum(transport, node_ids, request, length,
                                                     timeout)
        if total is None:
            return RoundOutcome(None, replies, retryable=retryable)
        outcome = self.strategy.from_sum(request, total)
        outcome.replies = replies
        return outcome

def _failed(reply: NodeReply, reason: str) -> NodeReply:
    """An error reply that keeps the node's privacy figures: its vector left it (and is
    charged in its ledger) even though the round's sum was not used."""
    return NodeReply("error", reply.node, reason, privacy=reply.privacy)
