"""Secure aggregation in the federation, the node's side: the wire codec, the vector a
node masks, and its answer to every protocol message (the coordinator's side is
``secure_aggregator``).

Each node encodes ``[n * (w - w_global) / K, n / K]`` (its examples-weighted model
change and its weight, ``K`` a public scale) in the ring and masks it
(``secagg.protocol``); the coordinator unmasks only the sum and sets
``w_global += sum(n * delta) / sum(n)``: FedAvg weighted by examples, without seeing
any node's model or example count. A node that refuses a round (budget) sends a masked
zero vector, so it stays in the protocol. Under secure aggregation a node tells the
coordinator nothing beside the masked vector but its status and ε (``public_privacy``).
"""

from __future__ import annotations

import base64
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import BudgetExceededError, PrivmedError
from privmed.federation.distributed import (
    STATS_ROUND,
    charge_release,
    node_statistics,
    noisy_gradient,
    stats_length,
)
from privmed.federation.node import Arrays, NodeReply, SiteNode, bind_survivors
from privmed.federation.secagg.encoding import FixedPoint
from privmed.federation.secagg.protocol import Params, ProtocolError, SecAggNode

_log = logging.getLogger("privmed.node")
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


def keys_of(base: Arrays, trainable: list[str] | None) -> list[str]:
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
              / WEIGHT_SCALE).ravel() for k in keys_of(base, trainable)]
    return np.concatenate([*parts, [num_examples / WEIGHT_SCALE]])


def vector_length(base: Arrays, trainable: list[str] | None = None) -> int:
    """Length of a round's vector: the trained values plus one weight (examples or the
    expected batch size)."""
    return sum(base[k].size for k in keys_of(base, trainable)) + 1





# ----------------------------------------------------------------------------- node side

def public_privacy(privacy: dict[str, Any]) -> dict[str, Any]:
    """What a node tells the coordinator of its privacy under secure aggregation: its ε
    (rounded up to 0.01, so that the per-round figures say little about its sample
    rate) and δ, never σ, q or the history, from which its image count follows."""
    out = {k: privacy[k] for k in ("enabled", "mode", "unit", "delta", "accountant",
                                   "rounds_trained")
           if k in privacy}
    if privacy.get("epsilon") is not None:
        out["epsilon"] = math.ceil(float(privacy["epsilon"]) * 100 - 1e-9) / 100
    return out


def _min_survivors(reply: NodeReply) -> int:
    """The threshold a stored noisy vector's noise assumed (0 for one without a share)."""
    return int(reply.privacy.get("secagg_threshold") or 0)


def handle_secure(node: SiteNode, kind: str, job_id: str, payload: dict[str, Any],
                  round_no: int, arrays: Arrays | None, job: Any) -> dict[str, Any]:
    """A node's answer to one secure-aggregation message; returns {"meta", "arrays"}."""
    sessions: dict[str, SecAggNode] = node.__dict__.setdefault("_secagg", {})
    try:
        if kind == "secagg-advertise":
            params = Params(run_id=payload["run_id"], threshold=2, encoding=ENCODING,
                            instances=int(payload["instances"]))
            sessions[job_id] = SecAggNode(int(payload["node_id"]), params)
            return _ok(advert=sessions[job_id].advertise())
        session = sessions.get(job_id)
        if session is None:
            raise ProtocolError("This node holds no key setup for the job (was it restarted?).")
        if kind == "secagg-keys":
            blobs, commits = session.share_keys(payload["roster"], int(payload["threshold"]),
                                                max_roster=node.max_sites)
            return _ok(shares=blobs, commits=commits)
        if kind == "secagg-shares":
            return _ok(bad=session.receive_key_shares(payload["shares"]))
        if kind == "secagg-unmask":
            instance, survivors = int(payload["instance"]), payload["survivors"]
            out = session.unmask(instance, survivors, payload["dropped"], payload["b_shares"])
            stored = (session.tag_of(instance) or {}).get("file")
            if stored:  # a stored vector is revealed with one set of survivors, ever
                bind_survivors(Path(stored), survivors)
            return _ok(**out)
        if kind == "train":
            assert arrays is not None
            return _secure_train(node, session, payload, round_no, arrays, job)
        raise ProtocolError(f"Unknown secure-aggregation message '{kind}'.")
    except PrivmedError as exc:
        return {"meta": pack({"status": "error", "reason": str(exc)}), "arrays": None}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {"meta": pack({"status": "error", "reason": f"The '{kind}' message is "
                              "malformed."}), "arrays": None}


def _ok(**fields: Any) -> dict[str, Any]:
    return {"meta": pack({"status": "ok", **fields}), "arrays": None}


def _secure_train(node: SiteNode, session: SecAggNode, payload: dict[str, Any], round_no: int,
                  arrays: Arrays, job: Any) -> dict[str, Any]:
    """Compute (or replay) this node's vector for the round and send it masked, with only
    what the secure sum protects: no example count, loss, timing, sample rate, replay
    flag or reason that could carry a figure of the node's data."""
    threshold = session.params.threshold
    trainable = payload.get("trainable")
    stats = payload.get("phase") == "stats"
    if stats:
        reply = node_statistics(node, job, threshold)
        vector = (reply.arrays or {}).get("stats")
        length = stats_length(node.bundle.train.image_shape[0])
        stored = node.stored_path(job, "stats.pt")
    elif job.distributed:
        reply = noisy_gradient(node, job, round_no, arrays, threshold, trainable or [])
        vector = (reply.arrays or {}).get("grad")
        length = vector_length(arrays, trainable)
        stored = node.stored_path(job, f"round-{round_no:04d}.pt")
    else:
        reply = node.train_round(job, round_no, arrays, secure=True)
        vector = (flatten_update(reply.arrays, arrays, reply.num_examples, trainable)
                  if reply.status == "ok" and reply.arrays is not None else None)
        length = vector_length(arrays, trainable)
        stored = node.stored_path(job, f"round-{round_no:04d}.pt")
    if reply.status == "error":
        # An error's sentence may name the node's image count or shape: it stays here.
        _log.warning("Round %s of job %s: %s", round_no, job.job_id, reply.reason)
        reply.reason = ("it could not compute its update (the reason is in the node's log; "
                        "secure aggregation keeps it from the coordinator)")
    if vector is not None and (np.shape(vector) != (length,)
                               or not np.all(np.isfinite(vector))):
        reply = NodeReply("error", node.name, "its update holds NaN or infinite values (or "
                          "has the wrong length): not sent")
        vector = None
    meta = reply.meta()
    meta.update(num_examples=0, metrics={}, privacy=public_privacy(reply.privacy),
                replayed=False)
    if reply.status != "ok" or vector is None:
        if job.distributed or stats:
            # No masked input: this node counts as dropped, so a round keeps its noise
            # only if at least t nodes that did add their share survive.
            return {"meta": pack(meta), "arrays": None}
        vector, stored = np.zeros(length), None  # local DP: a refusal masks zeros
    tag = {"round": round_no, "file": str(stored) if stored and stored.exists() else None}
    masked = session.masked_input(int(payload["instance"]), payload["active"], vector,
                                  min_survivors=_min_survivors(reply), tag=tag)
    if reply.status == "ok":
        try:  # it leaves the node now: charged before it does
            charge_release(node, job.job_id, STATS_ROUND if stats else round_no)
        except BudgetExceededError as exc:
            meta.update(status="refused", reason=str(exc))
            return {"meta": pack(meta), "arrays": None}
    meta.update(secure={"b_shares": masked["b_shares"], "b_commit": masked["b_commit"],
                        "share_commits": masked["share_commits"]})
    return {"meta": pack(meta), "arrays": {"y": masked["y"]}}


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
        payload.update(active=active, instance=extra.pop("secure_instance", None), **extra)
    job_id = str(payload.get("job_id", job.job_id))
    return handle_secure(node, kind, job_id, payload, round_no, request.get("arrays"), job)
