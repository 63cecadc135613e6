"""One round of aggregation, behind an interface a secure protocol can take over.

The coordinator's loop (``coordinator.run_federation``) never touches messages: it asks
an :class:`Aggregator` to run a round over a :class:`Transport` and gets back the new
global weights plus each node's reply. :class:`FedAvg` sends the global model, collects
the nodes' models and averages them weighted by examples; a secure aggregator runs its
own message exchange over the same transport and returns only the (noisy) sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from privmed.federation.node import Arrays, NodeReply


@dataclass
class RoundRequest:
    """What every selected node receives for one round."""

    round: int
    config: dict[str, Any]
    arrays: Arrays


class Transport(Protocol):
    """Moves round requests to nodes and their replies back (Flower in deployment)."""

    def node_ids(self) -> list[int]:
        """The nodes connected now."""
        ...

    def train(self, node_ids: list[int], request: RoundRequest,
              timeout: float) -> dict[int, NodeReply]:
        """Send ``request`` to each node and wait for the replies; a node that fails,
        or does not answer within ``timeout`` seconds, gets an ``error`` reply."""
        ...

    def exchange(self, kind: str, payloads: dict[int, str], round_no: int, timeout: float
                 ) -> dict[int, tuple[str | None, Arrays | None]]:
        """A protocol message (e.g. secure aggregation's) to each node; replies are
        ``(meta JSON, arrays)``, ``(None, None)`` for a node that failed or was silent."""
        ...


@dataclass
class RoundOutcome:
    arrays: Arrays | None  # None: no node contributed, the global model is unchanged
    replies: dict[int, NodeReply] = field(default_factory=dict)
    retryable: bool = False  # the round could not be recovered; trying again may succeed
    evaluated: Arrays | None = None  # the model to evaluate and save, when not ``arrays``
    # Secure aggregation, --dp local: the contributors' image count, summed with their
    # updates (the one count the coordinator learns); None where it learns none.
    total_examples: int | None = None

    @property
    def contributors(self) -> list[int]:
        return [n for n, r in self.replies.items() if r.status == "ok"]


class Aggregator(Protocol):
    name: str

    def run_round(self, transport: Transport, node_ids: list[int],
                  request: RoundRequest, timeout: float) -> RoundOutcome:
        ...

    def statistics(self, transport: Transport, node_ids: list[int], job: Any, channels: int,
                   timeout: float) -> tuple[list[float], list[float]] | None:
        """Per-channel pixel (mean, std) over all sites, or None when it failed."""
        ...


def check_update(reply: NodeReply, reference: Arrays) -> str | None:
    """Why a node's returned weights cannot be aggregated, or None when they can."""
    if reply.arrays is None:
        return "it sent no weights"
    if set(reply.arrays) != set(reference):
        return "its weights have different parameter names"
    for key, ref in reference.items():
        value = reply.arrays[key]
        if value.shape != ref.shape:
            return f"parameter {key} has shape {value.shape}, expected {ref.shape}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"parameter {key} holds NaN or infinite values"
    if reply.num_examples < 1:
        return "it reported no training examples"
    return None


def weighted_mean(updates: list[tuple[Arrays, int]]) -> Arrays:
    """Examples-weighted mean of the nodes' weights (FedAvg, McMahan et al. 2017).

    Integer buffers (e.g. counters) are taken from the largest node rather than averaged.
    """
    total = sum(n for _, n in updates)
    first = updates[0][0]
    out: Arrays = {}
    for key, ref in first.items():
        if np.issubdtype(ref.dtype, np.floating):
            acc = np.zeros(ref.shape, dtype=np.float64)
            for arrays, n in updates:
                acc += arrays[key].astype(np.float64) * (n / total)
            out[key] = acc.astype(ref.dtype)
        else:
            out[key] = max(updates, key=lambda u: u[1])[0][key].copy()
    return out


class FedAvg:
    """Plain (non-secure) FedAvg: the coordinator sees every node's model."""

    name = "fedavg"

    def statistics(self, transport: Transport, node_ids: list[int], job: Any, channels: int,
                   timeout: float) -> tuple[list[float], list[float]] | None:
        """Sum of the nodes' (each fully noised) statistics vectors."""
        from privmed.federation.distributed import (
            statistics_from_sum,
            stats_length,
            stats_request,
        )

        replies = transport.train(node_ids, stats_request(job), timeout)
        vectors = [r.arrays["stats"] for r in replies.values()
                   if r.status == "ok" and r.arrays and "stats" in r.arrays
                   and np.shape(r.arrays["stats"]) == (stats_length(channels),)]
        return statistics_from_sum(np.sum(vectors, axis=0), channels) if vectors else None

    def run_round(self, transport: Transport, node_ids: list[int],
                  request: RoundRequest, timeout: float) -> RoundOutcome:
        replies = transport.train(node_ids, request, timeout)
        usable: list[tuple[Arrays, int]] = []
        for node_id, reply in replies.items():
            if reply.status != "ok":
                continue
            problem = check_update(reply, request.arrays)
            if problem is not None:
                replies[node_id] = NodeReply("error", reply.node, f"update excluded: {problem}",
                                             reply.num_examples, reply.metrics, reply.privacy)
                continue
            usable.append((reply.arrays, reply.num_examples))
        return RoundOutcome(weighted_mean(usable) if usable else None, replies)
