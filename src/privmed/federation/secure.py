"""Secure aggregation in the federation: the node's side and the coordinator's Aggregator.

Each node encodes ``[n * (w - w_global) / K, n / K]`` (its examples-weighted model
change and its weight, ``K`` a public scale) in the ring and masks it
(``secagg.protocol``); the coordinator unmasks only the sum and sets
``w_global += sum(n * delta) / sum(n)``: FedAvg weighted by examples, without seeing
any node's model or example count. A node that refuses a round (budget) sends a masked
zero vector, so it stays in the protocol and its refusal costs it no key.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from typing import Any

import numpy as np

from privmed.errors import PrivmedError
from privmed.federation.aggregation import RoundOutcome, RoundRequest, Transport
from privmed.federation.node import Arrays, NodeReply, SiteNode
from privmed.federation.secagg.encoding import FixedPoint
from privmed.federation.secagg.protocol import (
    Params,
    ProtocolError,
    RecoveryError,
    SecAggNode,
    SecAggServer,
)

# Public scale of the weights: n / K stays well inside the ring for sites up to ~10^5.
WEIGHT_SCALE = 1000.0
# Ring and precision: 1024 nodes x |value| <= 64 x 2^20 stays below 2^61.
ENCODING = FixedPoint(clip=64.0, frac_bits=20, modulus_bits=62, max_parties=1024)


# ----------------------------------------------------------------------------- wire codec

def pack(obj: Any) -> str:
    """JSON for protocol payloads: bytes, int-keyed dicts and tuples survive."""
    def enc(o: Any) -> Any:
        if isinstance(o, bytes):
            return {"__b": base64.b64encode(o).decode("ascii")}
        if isinstance(o, dict):
            if all(isinstance(k, int) for k in o) and o:
                return {"__i": [[k, enc(v)] for k, v in o.items()]}
            return {str(k): enc(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [enc(v) for v in o]
        return o
    return json.dumps(enc(obj))


def unpack(text: str) -> Any:
    def dec(o: Any) -> Any:
        if isinstance(o, dict):
            if set(o) == {"__b"}:
                return base64.b64decode(o["__b"])
            if set(o) == {"__i"}:
                return {int(k): dec(v) for k, v in o["__i"]}
            return {k: dec(v) for k, v in o.items()}
        if isinstance(o, list):
            return [dec(v) for v in o]
        return o
    return dec(json.loads(text))


def _float_keys(arrays: Arrays) -> list[str]:
    return sorted(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating))


def flatten_update(trained: Arrays, base: Arrays, num_examples: int) -> np.ndarray:
    parts = [((trained[k].astype(np.float64) - base[k].astype(np.float64)) * num_examples
              / WEIGHT_SCALE).ravel() for k in _float_keys(base)]
    return np.concatenate([*parts, [num_examples / WEIGHT_SCALE]])


def vector_length(base: Arrays) -> int:
    return sum(base[k].size for k in _float_keys(base)) + 1


# ----------------------------------------------------------------------------- node side

def handle_secure(node: SiteNode, kind: str, job_id: str, payload: dict[str, Any],
                  round_no: int, arrays: Arrays | None, job: Any) -> dict[str, Any]:
    """A node's answer to one secure-aggregation message; returns {"meta", "arrays"}."""
    sessions: dict[str, SecAggNode] = node.__dict__.setdefault("_secagg", {})
    try:
        if kind == "secagg-advertise":
            params = Params(run_id=payload["run_id"], threshold=int(payload["threshold"]),
                            encoding=ENCODING)
            sessions[job_id] = SecAggNode(int(payload["node_id"]), params)
            return {"meta": pack({"status": "ok", "advert": sessions[job_id].advertise()}),
                    "arrays": None}
        session = sessions.get(job_id)
        if session is None:
            raise ProtocolError("This node holds no key setup for the job (was it restarted?).")
        if kind == "secagg-keys":
            shares = session.share_keys(payload["roster"], int(payload["threshold"]))
            return {"meta": pack({"status": "ok", "shares": shares}), "arrays": None}
        if kind == "secagg-shares":
            session.receive_key_shares(payload["shares"])
            return {"meta": pack({"status": "ok"}), "arrays": None}
        if kind == "secagg-unmask":
            out = session.unmask(round_no, payload["survivors"], payload["dropped"],
                                 payload["b_shares"])
            return {"meta": pack({"status": "ok", **out}), "arrays": None}
        if kind == "train":
            assert arrays is not None
            reply = node.train_round(job, round_no, arrays)
            if reply.status == "ok" and reply.arrays is not None:
                vector = flatten_update(reply.arrays, arrays, reply.num_examples)
            else:  # a refusal or an error still masks zeros, so the round can finish
                vector = np.zeros(vector_length(arrays))
            clipped = int(np.sum(np.abs(vector) > ENCODING.clip))
            masked = session.masked_input(round_no, payload["active"], vector)
            meta = reply.meta()
            meta.update(num_examples=0, metrics={"seconds": reply.metrics.get("seconds"),
                                                 "clipped_values": clipped},
                        secure={"b_shares": masked["b_shares"]})
            return {"meta": pack(meta), "arrays": {"y": masked["y"]}}
        raise ProtocolError(f"Unknown secure-aggregation message '{kind}'.")
    except PrivmedError as exc:
        return {"meta": pack({"status": "error", "reason": str(exc)}), "arrays": None}


def handle_request(node: SiteNode, request: dict[str, Any]) -> dict[str, Any]:
    """Everything a node answers: a (plain or secure) training round or a protocol step.

    ``request``: ``kind`` ("train" or "secagg-*"), ``job`` (JSON of the job record,
    possibly with ``secure_active``), ``round``, ``arrays``, ``payload`` (packed JSON).
    """
    from privmed.federation.config import FederationConfig

    record = json.loads(request["job"])
    active = record.pop("secure_active", None)
    job = FederationConfig.from_record(record)
    kind = request.get("kind", "train")
    round_no = int(request["round"])
    if kind == "train" and active is None:
        reply = node.train_round(job, round_no, request["arrays"])
        return {"meta": json.dumps(reply.meta()), "arrays": reply.arrays}
    payload = unpack(request["payload"]) if request.get("payload") else {}
    if kind == "train":
        payload["active"] = active
    job_id = str(payload.get("job_id", job.job_id))
    return handle_secure(node, kind, job_id, payload, round_no, request.get("arrays"), job)


# ----------------------------------------------------------------------------- coordinator

class SecureAggregator:
    """Aggregator that sees only the sum of the nodes' weighted updates."""

    name = "secagg"

    def __init__(self, job_id: str, threshold_fraction: float = 2 / 3,
                 log: Any = print) -> None:
        self.job_id, self.fraction, self.log = job_id, threshold_fraction, log
        self.server: SecAggServer | None = None
        self.total_examples = 0  # the one count the coordinator learns: the sum

    def _ask(self, transport: Transport, kind: str, payloads: dict[int, dict], round_no: int,
             timeout: float) -> dict[int, dict]:
        replies = transport.exchange(kind, {n: pack({**p, "job_id": self.job_id})
                                            for n, p in payloads.items()}, round_no, timeout)
        out = {}
        for node, (meta, _) in replies.items():
            msg = unpack(meta) if meta else {"status": "error", "reason": "no reply"}
            if msg.get("status") == "ok":
                out[node] = msg
            else:
                self.log(f"Secure aggregation: node {node} {kind}: {msg.get('reason')}")
        return out

    def _setup(self, transport: Transport, node_ids: list[int], timeout: float) -> None:
        run_id = secrets.token_bytes(16)
        adverts = self._ask(transport, "secagg-advertise", {
            n: {"run_id": run_id, "threshold": 2, "node_id": n} for n in node_ids}, 0, timeout)
        # The threshold follows the nodes that actually answered, not those listed.
        threshold = max(2, math.ceil(self.fraction * len(adverts)))
        server = SecAggServer(Params(run_id=run_id, threshold=threshold, encoding=ENCODING))
        roster = server.make_roster({n: m["advert"] for n, m in adverts.items()})
        shares = self._ask(transport, "secagg-keys", {
            n: {"roster": roster, "threshold": threshold} for n in roster}, 0, timeout)
        inbox = server.route({n: m["shares"] for n, m in shares.items()})
        done = self._ask(transport, "secagg-shares", {n: {"shares": inbox.get(n, {})}
                                                      for n in shares}, 0, timeout)
        server.roster = {n: roster[n] for n in done}
        if len(server.roster) < threshold:
            raise RecoveryError(f"Only {len(server.roster)} nodes finished key setup; "
                                f"{threshold} are needed.")
        self.log(f"Secure aggregation set up with {len(server.roster)} nodes, threshold "
                 f"{threshold}.")
        self.server = server

    def run_round(self, transport: Transport, node_ids: list[int], request: RoundRequest,
                  timeout: float) -> RoundOutcome:
        if self.server is None:
            self._setup(transport, node_ids, timeout)
        server = self.server
        assert server is not None
        active = server.active()
        length = vector_length(request.arrays)
        replies = transport.train(active, RoundRequest(
            request.round, {**request.config, "secure_active": active}, request.arrays),
            timeout)
        inputs: dict[int, dict] = {}
        for node, reply in replies.items():
            y = (reply.arrays or {}).get("y")
            shares = (reply.secure or {}).get("b_shares")
            if y is not None and shares is not None:
                inputs[node] = {"y": np.asarray(y), "b_shares": shares}
        try:
            survivors, dropped, reasons = server.collect(active, inputs, length)
            for node, why in reasons.items():
                if node in replies and replies[node].status == "ok":
                    replies[node] = NodeReply("error", replies[node].node, f"excluded: {why}")
            routed = server.route({n: inputs[n]["b_shares"] for n in survivors})
            unmask = self._ask(transport, "secagg-unmask", {
                n: {"survivors": survivors, "dropped": dropped, "b_shares": routed[n]}
                for n in survivors}, request.round, timeout)
            total = server.unmask(request.round, inputs, survivors, dropped,
                                  {n: {"b": m["b"], "s": m["s"]} for n, m in unmask.items()},
                                  length)
        except RecoveryError as exc:
            self.log(f"Round {request.round}: {exc}")
            for node, reply in replies.items():
                if reply.status == "ok":
                    replies[node] = NodeReply("error", reply.node, str(exc))
            return RoundOutcome(None, replies)
        weight = total[-1] * WEIGHT_SCALE
        self.total_examples = round(weight)
        if weight <= 0.5:  # no node trained (all refused or failed)
            return RoundOutcome(None, replies)
        new, offset = {k: v.copy() for k, v in request.arrays.items()}, 0
        for key in _float_keys(request.arrays):
            size = request.arrays[key].size
            delta = total[offset:offset + size] * WEIGHT_SCALE / weight
            new[key] = (request.arrays[key].astype(np.float64)
                        + delta.reshape(request.arrays[key].shape)).astype(
                request.arrays[key].dtype)
            offset += size
        return RoundOutcome(new, replies)
