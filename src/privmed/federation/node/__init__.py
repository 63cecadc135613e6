"""A hospital's side of the federation: ``site`` (the node's data, ledger, plan and keys),
``updates`` (what a round computes), ``handler`` (the one dispatch of every request),
``replies`` (the replay store) and ``worker`` (the long-lived process beside Flower's
per-message ClientApp). Nothing here imports the coordinator's side."""
