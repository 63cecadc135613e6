"""A finished secure-aggregation key setup in one process: real keys, real sealed shares."""

from __future__ import annotations

import secrets

from privmed.federation.secagg.encoding import FixedPoint
from privmed.federation.secagg.protocol import Params, SecAggNode, SecAggServer


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
