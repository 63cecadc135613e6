"""Federated training: nodes beside each hospital's data, a coordinator that aggregates.

Split by role: ``config`` (what a job asks of every node) and ``messages`` (what the two
sides say to each other) are shared; ``node/`` is a hospital's side (its data, ledger,
plan and secure-aggregation keys, what a round computes, the one request handler);
``coordinator/`` is the aggregating side (the round loop, FedAvg / FedSGD, the secure
aggregator that sees only sums, the results); ``secagg/`` is the secure-aggregation
protocol; ``runtime/`` runs the roles (Flower apps and processes, credentials, the
in-process transport). ``node/`` and ``coordinator/`` never import each other.
"""

_LAZY = {
    "FederationConfig": "privmed.federation.config",
    "NodeReply": "privmed.federation.messages",
    "RoundOutcome": "privmed.federation.messages",
    "RoundRequest": "privmed.federation.messages",
    "Transport": "privmed.federation.messages",
    "SiteNode": "privmed.federation.node.site",
    "Aggregator": "privmed.federation.coordinator.strategies",
    "FedAvg": "privmed.federation.coordinator.strategies",
    "FedSGD": "privmed.federation.coordinator.strategies",
    "PlainAggregator": "privmed.federation.coordinator.strategies",
    "SecureAggregator": "privmed.federation.coordinator.secure",
    "FederationError": "privmed.federation.coordinator.loop",
    "run_federation": "privmed.federation.coordinator.loop",
    "InProcessTransport": "privmed.federation.runtime.inprocess",
}


def __getattr__(name: str):  # lazy: the ClientApp process must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'privmed.federation' has no attribute {name!r}")


__all__ = list(_LAZY)
