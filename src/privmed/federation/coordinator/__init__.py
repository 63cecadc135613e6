"""The coordinator's side of the federation: ``loop`` (rounds, evaluation, checkpoints),
``strategies`` (what it may see and what it does with it: plain or secure aggregation,
FedAvg or FedSGD), ``secure`` (the aggregator that sees only sums) and ``results``
(``results.json`` with only what the coordinator legitimately knows). Nothing here imports
the nodes' side."""
