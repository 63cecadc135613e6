"""A light federation for attacks on the coordinator: the real SecureAggregator and the
real node handler (``node.handler.handle_request``) answer every protocol message; only the
training step is replaced by masking a fixed vector per node (no torch). Per-node hooks
rewrite a node's replies, as a malicious or broken node would."""

from __future__ import annotations

import numpy as np

from privmed.federation.config import FederationConfig
from privmed.federation.messages import NodeReply, RoundRequest, pack, unpack
from privmed.federation.node.handler import handle_request


class FakeNode:
    """What the handler needs of a site: a name, no ledger, no site limit."""

    def __init__(self, name: str, vector: np.ndarray) -> None:
        self.name, self.vector = name, vector
        self.max_sites = None
        self.ledger_path = None
        self.sessions = {}


class FastTransport:
    """``hooks[node][kind]``: a function of the reply (meta text for protocol messages, the
    NodeReply for "train") that returns what the node sends instead."""

    def __init__(self, nodes: dict[int, FakeNode], hooks: dict | None = None) -> None:
        self.nodes, self.hooks = nodes, hooks or {}

    def node_ids(self) -> list[int]:
        return list(self.nodes)

    def train(self, node_ids, request, timeout):
        out = {}
        for n in node_ids:
            node = self.nodes[n]
            session = node.sessions[request.job.job_id]
            m = session.masked_input(int(request.instance), request.active,
                                     node.vector, tag={"round": request.round, "file": None})
            secure = {k: m[k] for k in ("b_shares", "b_commit", "share_commits")}
            reply = NodeReply.from_meta(unpack(pack({**NodeReply("ok", node.name).meta(),
                                                     "secure": secure})), {"y": m["y"]})
            hook = self.hooks.get(n, {}).get("train")
            out[n] = hook(reply) if hook else reply
        return out

    def exchange(self, kind, payloads, round_no, timeout):
        out = {}
        for n, p in payloads.items():
            meta = handle_request(self.nodes[n], {"kind": kind, "round": round_no,
                                                  "payload": p})["meta"]
            hook = self.hooks.get(n, {}).get(kind)
            out[n] = (hook(meta) if hook else meta, None)
        return out


def fast_request(round_no: int, rounds: int = 5) -> RoundRequest:
    return RoundRequest(round_no, FederationConfig(job_id="j", model="none", rounds=rounds), {})
