"""Federated training: nodes beside each hospital's data, a coordinator that aggregates.

``SiteNode`` (node.py) is ``fit()`` for one round behind the node's own ledger;
``run_federation`` (coordinator.py) is the round loop; ``FedAvg`` (aggregation.py) the
swappable aggregation step; ``flower_apps`` wires both into Flower's ServerApp and
ClientApp, ``secure`` (nodes) and ``secure_aggregator`` (coordinator), with
``secagg/``, aggregate so that the coordinator sees only a sum, ``distributed`` splits
the DP noise across nodes (FedSGD) and measures the normalisation statistics, ``worker``
keeps a node's data and torch loaded between Flower's per-message ClientApp processes,
``launcher`` starts and stops the Flower processes, ``fleet_gateway`` is the coordinator's
only public listener (Flower's Fleet API, nothing else) and ``node_link`` keeps a node's
SuperNode connected through refusals that pass.
"""

_LAZY = {
    "Aggregator": "privmed.federation.aggregation",
    "FedAvg": "privmed.federation.aggregation",
    "RoundOutcome": "privmed.federation.aggregation",
    "RoundRequest": "privmed.federation.aggregation",
    "FederationConfig": "privmed.federation.config",
    "FederationError": "privmed.federation.coordinator",
    "run_federation": "privmed.federation.coordinator",
    "NodeReply": "privmed.federation.node",
    "SiteNode": "privmed.federation.node",
    "SecureAggregator": "privmed.federation.secure_aggregator",
    "InProcessTransport": "privmed.federation.inprocess",
}


def __getattr__(name: str):  # lazy: the ClientApp process must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'privmed.federation' has no attribute {name!r}")


__all__ = list(_LAZY)
