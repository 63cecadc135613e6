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
from privmed.federation.distributed import (
    ServerOptimizer,
    commit_release,
    node_statistics,
    noisy_gradient,
    statistics_from_sum,
    stats_length,
    stats_request,
)
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


def _keys(base: Arrays, trainable: list[str] | None) -> list[str]:
    """The arrays that training changes: the coordinator names them (a fixed front end's
    buffers never change, so they are not sent); all float arrays otherwise."""
    if trainable is None:
        return _float_keys(base)
    missing = [k for k in trainable if k not in base]
    if missing:
        raise ProtocolError(f"The round names parameters the model lacks: {missing[:3]}.")
    return sorted(trainable)


def flatten_update(trained: Arrays, base: Arrays, num_examples: int,
                   trainable: list[str] | None = None) -> np.ndarray:
    parts = [((trained[k].astype(np.float64) - base[k].astype(np.float64)) * num_examples
              / WEIGHT_SCALE).ravel() for k in _keys(base, trainable)]
    return np.concatenate([*parts, [num_examples / WEIGHT_SCALE]])


def vector_length(base: Arrays, trainable: list[str] | None = None) -> int:
    """Length of a round's vector: the trained values plus one weight (examples or the
    expected batch size)."""
    return sum(base[k].size for k in _keys(base, trainable)) + 1





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
            # Revealing these shares lets the coordinator compute the sum: the release.
            commit_release(node, job_id, round_no)
            return {"meta": pack({"status": "ok", **out}), "arrays": None}
        if kind == "train":
            assert arrays is not None
            threshold = session.params.threshold
            trainable = payload.get("trainable")
            if payload.get("phase") == "stats":
                reply = node_statistics(node, job, threshold)
                vector = (reply.arrays or {}).get("stats")
                length = stats_length(node.bundle.train.image_shape[0])
            elif job.distributed:
                reply = noisy_gradient(node, job, round_no, arrays, threshold, trainable or [])
                vector = (reply.arrays or {}).get("grad")
                length = vector_length(arrays, trainable)
            else:
                reply = node.train_round(job, round_no, arrays)
                vector = (flatten_update(reply.arrays, arrays, reply.num_examples, trainable)
                          if reply.status == "ok" and reply.arrays is not None else None)
                length = vector_length(arrays, trainable)
            if (reply.status != "ok" or vector is None) and (
                    job.distributed or payload.get("phase") == "stats"):
                # No masked input: this node counts as dropped, so a round keeps its noise
                # only if at least t nodes that did add their share survive.
                return {"meta": pack(reply.meta()), "arrays": None}
            if reply.status != "ok" or vector is None:
                vector = np.zeros(length)  # local DP: a refusal masks zeros, the round goes on
            clipped = int(np.sum(np.abs(vector) > ENCODING.clip))
            masked = session.masked_input(round_no, payload["active"], vector)
            meta = reply.meta()
            meta.update(num_examples=0, metrics={"seconds": reply.metrics.get("seconds"),
                                                 "loss": reply.metrics.get("loss"),
                                                 "clipped_values": clipped},
                        secure={"b_shares": masked["b_shares"]})
            return {"meta": pack(meta), "arrays": {"y": masked["y"]}}
        raise ProtocolError(f"Unknown secure-aggregation message '{kind}'.")
    except PrivmedError as exc:
        return {"meta": pack({"status": "error", "reason": str(exc)}), "arrays": None}


def dump_sessions(node: SiteNode) -> str:
    """The node's secure-aggregation sessions as text (holds its secret keys)."""
    sessions = node.__dict__.get("_secagg", {})
    return pack({job: s.to_state() for job, s in sessions.items()})


def load_sessions(node: SiteNode, text: str) -> None:
    node.__dict__["_secagg"] = {job: SecAggNode.from_state(state, ENCODING)
                                for job, state in unpack(text).items()}


def handle_request(node: SiteNode, request: dict[str, Any]) -> dict[str, Any]:
    """Everything a node answers: a (plain or secure) training round or a protocol step.

    ``request``: ``kind`` ("train" or "secagg-*"), ``job`` (JSON of the job record,
    possibly with ``secure_active``), ``round``, ``arrays``, ``payload`` (packed JSON).
    """
    from privmed.federation.config import FederationConfig

    job, extra = FederationConfig.split_record(json.loads(request["job"]))
    active = extra.pop("secure_active", None)
    kind = request.get("kind", "train")
    round_no = int(request["round"])
    if kind == "train" and active is None:
        if extra.get("phase") == "stats":
            reply = node_statistics(node, job, None)
        else:
            reply = node.train_round(job, round_no, request["arrays"])
        return {"meta": json.dumps(reply.meta()), "arrays": reply.arrays}
    payload = unpack(request["payload"]) if request.get("payload") else {}
    if kind == "train":
        payload.update(active=active, **extra)
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
        self.optimizer: ServerOptimizer | None = None  # distributed DP: FedSGD steps
        self._optimizer_state: dict[str, Any] | None = None

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

    def _secure_sum(self, transport: Transport, node_ids: list[int], request: RoundRequest,
                    length: int, timeout: float) -> tuple[np.ndarray | None, dict[int, NodeReply]]:
        """The unmasked sum of the active nodes' vectors for ``request`` (None when the
        round cannot be recovered), and each node's reply."""
        if self.server is None:
            self._setup(transport, node_ids, timeout)
        server = self.server
        assert server is not None
        active = server.active()
        replies = transport.train(active, RoundRequest(
            request.round, {**request.config, "secure_active": active}, request.arrays),
            timeout)
        inputs: dict[int, dict] = {}
        for node, reply in replies.items():
            y = (reply.arrays or {}).get("y")
            shares = (reply.secure or {}).get("b_shares")
            if y is not None and shares is not None:
                inputs[node] = {"y": np.asarray(y), "b_shares": shares}
        dropped: list[int] = []
        asked = False
        try:
            survivors, dropped, reasons = server.collect(active, inputs, length)
            for node, why in reasons.items():
                if node in replies and replies[node].status == "ok":
                    replies[node] = NodeReply("error", replies[node].node, f"excluded: {why}")
            routed = server.route({n: inputs[n]["b_shares"] for n in survivors})
            asked = True
            unmask = self._ask(transport, "secagg-unmask", {
                n: {"survivors": survivors, "dropped": dropped, "b_shares": routed[n]}
                for n in survivors}, request.round, timeout)
            total = server.unmask(request.round, inputs, survivors, dropped,
                                  {n: {"b": m["b"], "s": m["s"]} for n, m in unmask.items()},
                                  length)
        except RecoveryError as exc:
            if asked:  # the nodes may have revealed these mask keys: never active again
                server.dropped |= set(dropped)
            self.log(f"Round {request.round}: {exc}")
            for node, reply in replies.items():
                if reply.status == "ok":
                    replies[node] = NodeReply("error", reply.node, str(exc))
            return None, replies
        return total, replies

    def statistics(self, transport: Transport, node_ids: list[int], job: Any, channels: int,
                   timeout: float) -> tuple[list[float], list[float]] | None:
        """Pixel mean and std per channel over all sites, through the secure sum."""
        total, _ = self._secure_sum(transport, node_ids, stats_request(job),
                                    stats_length(channels), timeout)
        return None if total is None else statistics_from_sum(total, channels)

    def run_round(self, transport: Transport, node_ids: list[int], request: RoundRequest,
                  timeout: float) -> RoundOutcome:
        trainable = request.config.get("trainable")
        length = vector_length(request.arrays, trainable)
        total, replies = self._secure_sum(transport, node_ids, request, length, timeout)
        if total is None:
            return RoundOutcome(None, replies, retryable=True)
        if request.config.get("dp") == "distributed":
            new = self._gradient_step(request, total)
            evaluated = self.optimizer.averaged(new) if new is not None and self.optimizer else None
            return RoundOutcome(new, replies, evaluated=evaluated)
        weight = total[-1] * WEIGHT_SCALE
        self.total_examples = round(weight)
        if weight <= 0.5:  # no node trained (all refused or failed)
            return RoundOutcome(None, replies)
        new, offset = {k: v.copy() for k, v in request.arrays.items()}, 0
        for key in _keys(request.arrays, trainable):
            size = request.arrays[key].size
            delta = total[offset:offset + size] * WEIGHT_SCALE / weight
            new[key] = (request.arrays[key].astype(np.float64)
                        + delta.reshape(request.arrays[key].shape)).astype(
                request.arrays[key].dtype)
            offset += size
        return RoundOutcome(new, replies)

    def _gradient_step(self, request: RoundRequest, total: np.ndarray) -> Arrays | None:
        from privmed.federation.config import FederationConfig

        if self.optimizer is None:
            job, extra = FederationConfig.split_record(request.config)
            self.optimizer = ServerOptimizer(request.arrays, extra["trainable"], job)
            if self._optimizer_state is not None:
                self.optimizer.load_state_dict(self._optimizer_state)
        try:
            return self.optimizer.step(request.arrays, total)
        except ValueError:  # every node refused: nothing was sampled
            return None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed job needs: the server optimiser (the keys are set up anew)."""
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._optimizer_state = state.get("optimizer")
