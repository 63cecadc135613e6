"""Building blocks of the federation tests, in one place: synthetic sites as SiteNodes with
their ledgers, jobs, round requests, a finished secure-aggregation key setup, a transport
that records the coordinator's whole view, and a light federation of fake nodes."""

from __future__ import annotations

import secrets

import numpy as np
import torch

from privmed.data import split_sites
from privmed.federation import FederationConfig, InProcessTransport, SiteNode
from privmed.federation.messages import (
    NodeReply,
    RoundRequest,
    pack,
    state_to_arrays,
    trainable_keys,
    unpack,
)
from privmed.federation.node.handler import handle_request
from privmed.federation.secagg.encoding import FixedPoint
from privmed.federation.secagg.protocol import Params, SecAggNode, SecAggServer
from privmed.models import create_model


def site_nodes(bundle, tmp_path, budgets: int | tuple[float, ...] = 3, first_id: int = 0,
               ledger=None) -> dict[int, SiteNode]:
    """One SiteNode per budget (an int: that many sites of budget 10) on
    ``split_sites(bundle, n, seed=0)``, named site-0, site-1, ... and numbered from
    ``first_id``, each with its own ledger ``tmp_path/site{i}.sqlite`` unless ``ledger``
    names one for all."""
    if isinstance(budgets, int):
        budgets = (10.0,) * budgets
    parts = split_sites(bundle, len(budgets), seed=0)
    return {first_id + i: SiteNode(part, ledger=ledger or tmp_path / f"site{i}.sqlite",
                                   budget_epsilon=budget, name=f"site-{i}")
            for i, (part, budget) in enumerate(zip(parts, budgets, strict=True))}


def attack_job(**kw):
    return FederationConfig(**{**dict(job_id="atk", model="scatter-linear", rounds=3,
                                      batch_size=64, epsilon=3.0, normalize=False), **kw})


def round_request(job, round_no):
    torch.manual_seed(job.seed)
    model = create_model(job.model, 1, 2, image_size=[28, 28])
    return RoundRequest(round_no, job, state_to_arrays(model),
                        trainable=trainable_keys(model))


class Wiretap(InProcessTransport):
    """The coordinator's whole view: every message it sends and every reply. ``silence``
    decides, per (kind, node, round, how many times this kind was sent this round),
    whether a node stays silent (dropped, crashed, timed out); ``rewrite[(kind, node)]``
    turns a node's protocol reply (meta text) into what a dishonest node sends."""

    def __init__(self, nodes, silence=lambda kind, node, round_no, call: False,
                 rewrite=None):
        super().__init__(nodes)
        self.silence, self.rewrite, self.sent, self.replies = silence, rewrite or {}, [], []
        self._calls: dict[tuple[str, int], int] = {}

    def _call(self, kind, round_no):
        key = (kind, round_no)
        self._calls[key] = self._calls.get(key, 0) + 1
        return self._calls[key]

    def train(self, node_ids, request, timeout):
        call = self._call("train", request.round)
        up = [n for n in node_ids if not self.silence("train", n, request.round, call)]
        out = super().train(up, request, timeout)
        self.sent.append(("train", request.round, request.to_wire()))
        for n in node_ids:
            if n not in up:
                out[n] = NodeReply("error", self.nodes[n].name, "silent")
        self.replies.append(("train", request.round, request.instance,
                             out))
        return out

    def exchange(self, kind, payloads, round_no, timeout):
        call = self._call(kind, round_no)
        up = {n: p for n, p in payloads.items() if not self.silence(kind, n, round_no, call)}
        out = super().exchange(kind, up, round_no, timeout)
        for n, (meta, arrays) in out.items():  # what a dishonest node sends instead
            if meta and (kind, n) in self.rewrite:
                out[n] = (self.rewrite[(kind, n)](meta), arrays)
        self.sent.append((kind, round_no, {n: unpack(p) for n, p in payloads.items()}))
        self.replies.append((kind, round_no, None,
                             {n: unpack(m) for n, (m, _) in out.items() if m}))
        return out


# A finished secure-aggregation key setup in one process: real keys, real sealed shares.


def key_setup(n: int = 5, t: int = 3, instances: int = 8):
    """``(params, nodes, server)`` for ``n`` nodes numbered 1..n, threshold ``t``."""
    params = Params(run_id=secrets.token_bytes(16), threshold=t,
                    encoding=FixedPoint(clip=4.0, frac_bits=16, modulus_bits=48,
                                        max_parties=16), instances=instances)
    nodes = {i: SecAggNode(i, params) for i in range(1, n + 1)}
    server = SecAggServer(params)
    roster = server.make_roster({i: node.advertise() for i, node in nodes.items()})
    dealt = {i: node.share_keys(roster) for i, node in nodes.items()}
    inbox = server.route({i: blobs for i, (blobs, _) in dealt.items()})
    reports = {i: node.receive_key_shares(inbox[i]) for i, node in nodes.items()}
    server.accept_key_shares(dealt, reports)
    return params, nodes, server


# A light federation for attacks on the coordinator: the real SecureAggregator and the
# real node handler (``node.handler.handle_request``) answer every protocol message; only the
# training step is replaced by masking a fixed vector per node (no torch). Per-node hooks
# rewrite a node's replies, as a malicious or broken node would.


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
                                     node.vector, tag={"round": request.round, "file": None},
                                     self_mask=request.self_mask)
            secure = {k: m[k] for k in ("b_shares", "b_commit", "share_commits") if k in m}
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
