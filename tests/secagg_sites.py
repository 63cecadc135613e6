"""Real sites for attacks on secure aggregation: nodes with SQLite ledgers, a job, round
requests, and a transport that records the coordinator's whole view."""

from __future__ import annotations

import torch

from privmed.data import split_sites
from privmed.federation import FederationConfig, InProcessTransport, SiteNode
from privmed.federation.messages import (
    NodeReply,
    RoundRequest,
    state_to_arrays,
    trainable_keys,
    unpack,
)
from privmed.models import create_model


def sites(bundle, tmp_path, count):
    sites = split_sites(bundle, count, seed=0)
    return {3000 + i: SiteNode(s, ledger=tmp_path / f"site{i}.sqlite", budget_epsilon=10.0,
                               name=f"site-{i}") for i, s in enumerate(sites)}


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
