"""A Transport that calls each node's request handler directly, in this process.

The same handler the node worker and the simulation use (``node.handler``),
without Flower: for tests and benchmarks that need many rounds on one machine.
"""

from __future__ import annotations

import json

from privmed.federation.messages import Arrays, NodeReply, RoundRequest, unpack
from privmed.federation.node.handler import handle_request
from privmed.federation.node.site import SiteNode


class InProcessTransport:
    """Every node answers every message at once; ``silent`` nodes stop answering from the
    given round on (a node that died)."""

    def __init__(self, nodes: dict[int, SiteNode], silent: dict[int, int] | None = None
                 ) -> None:
        self.nodes, self.silent = nodes, dict(silent or {})
        self.calls: list[int] = []

    def node_ids(self) -> list[int]:
        return list(self.nodes)

    def _up(self, node: int, round_no: int) -> bool:
        return node not in self.silent or round_no < self.silent[node]

    def train(self, node_ids: list[int], request: RoundRequest, timeout: float
              ) -> dict[int, NodeReply]:
        self.calls.append(request.round)
        out = {}
        for n in node_ids:
            if not self._up(n, request.round):
                out[n] = NodeReply("error", self.nodes[n].name, "no reply")
                continue
            r = handle_request(self.nodes[n], {"kind": "train",
                                               "job": json.dumps(request.to_wire()),
                                               "round": request.round, "arrays": request.arrays})
            out[n] = NodeReply.from_meta(unpack(r["meta"]), r["arrays"])
        return out

    def exchange(self, kind: str, payloads: dict[int, str], round_no: int, timeout: float
                 ) -> dict[int, tuple[str | None, Arrays | None]]:
        out: dict[int, tuple[str | None, Arrays | None]] = {}
        for n, p in payloads.items():
            if not self._up(n, round_no):
                out[n] = (None, None)
                continue
            r = handle_request(self.nodes[n], {"kind": kind, "round": round_no, "payload": p})
            out[n] = (r["meta"], r["arrays"])
        return out
