"""Everything a node answers, in one dispatch: a round (plain or secure) or a protocol step.

Every transport (the node's worker behind Flower, Flower's simulation engine, the
in-process transport) hands a request here. Under secure aggregation each node masks one
vector (``secagg.protocol``): its local-DP model change weighted by examples
(``messages.flatten_update``), its distributed-DP gradient share, or its statistics; the
coordinator unmasks only the sum. A node that refuses a local-DP round (budget) masks
zeros, so it stays in the protocol. Under secure aggregation a node tells the coordinator
nothing beside the masked vector but its status and ε (:func:`public_privacy`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import BudgetExceededError, PrivmedError
from privmed.federation.messages import (
    ENCODING,
    STATS_ROUND,
    NodeReply,
    RoundRequest,
    flatten_update,
    pack,
    stats_length,
    unpack,
    vector_length,
)
from privmed.federation.node.replies import bind_survivors
from privmed.federation.node.site import SiteNode
from privmed.federation.node.updates import node_statistics, noisy_gradient, train_round
from privmed.federation.secagg.protocol import Params, ProtocolError, SecAggNode

_log = logging.getLogger("privmed.node")


def handle_request(node: SiteNode, request: dict[str, Any]) -> dict[str, Any]:
    """A node's answer to one request: ``kind`` ("train" or "secagg-*"), ``job`` (JSON of
    the round's record: the job and the request's own keys), ``round``, ``arrays``,
    ``payload`` (packed JSON of a protocol step). Returns ``{"meta", "arrays"}``."""
    kind = request.get("kind", "train")
    try:
        if kind != "train":
            return _protocol_step(node, kind, unpack(request["payload"]))
        round_request = RoundRequest.from_wire(int(request["round"]), json.loads(request["job"]),
                                               request.get("arrays"))
    except PrivmedError as exc:
        return _error(str(exc))
    except (KeyError, TypeError, ValueError, AttributeError):
        return _error(f"The '{kind}' message is malformed.")
    if round_request.secure:
        return _secure_round(node, round_request)
    job = round_request.job
    if round_request.phase == "stats":
        reply = node_statistics(node, job, None)
    else:
        reply = train_round(node, job, round_request.round, round_request.arrays)
    return {"meta": json.dumps(reply.meta()), "arrays": reply.arrays}


def _error(reason: str) -> dict[str, Any]:
    return {"meta": pack({"status": "error", "reason": reason}), "arrays": None}


def _ok(**fields: Any) -> dict[str, Any]:
    return {"meta": pack({"status": "ok", **fields}), "arrays": None}


def _session(node: SiteNode, job_id: str) -> SecAggNode:
    session = node.sessions.get(job_id)
    if session is None:
        raise ProtocolError("This node holds no key setup for the job (was it restarted?).")
    return session


def _protocol_step(node: SiteNode, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Key agreement, key-share routing and unmasking: the secure-aggregation steps."""
    job_id = str(payload["job_id"])
    if kind == "secagg-advertise":
        params = Params(run_id=payload["run_id"], threshold=2, encoding=ENCODING,
                        instances=int(payload["instances"]))
        node.sessions[job_id] = SecAggNode(int(payload["node_id"]), params)
        return _ok(advert=node.sessions[job_id].advertise())
    session = _session(node, job_id)
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
    raise ProtocolError(f"Unknown secure-aggregation message '{kind}'.")


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


def _secure_round(node: SiteNode, request: RoundRequest) -> dict[str, Any]:
    """Compute (or replay) this node's vector for the round and send it masked, with only
    what the secure sum protects: no example count, loss, timing, sample rate, replay
    flag or reason that could carry a figure of the node's data."""
    job, round_no, arrays = request.job, request.round, request.arrays
    try:
        session = _session(node, job.job_id)
        threshold = session.params.threshold
        stats = request.phase == "stats"
        if stats:
            reply = node_statistics(node, job, threshold)
            vector = (reply.arrays or {}).get("stats")
            length = stats_length(node.bundle.train.image_shape[0])
        elif job.distributed:
            reply = noisy_gradient(node, job, round_no, arrays, threshold,
                                   request.trainable or [])
            vector = (reply.arrays or {}).get("grad")
            length = vector_length(arrays, request.trainable)
        else:
            reply = train_round(node, job, round_no, arrays, secure=True)
            vector = (flatten_update(reply.arrays, arrays, reply.num_examples,
                                     request.trainable)
                      if reply.status == "ok" and reply.arrays is not None else None)
            length = vector_length(arrays, request.trainable)
        stored = node.stored_path(job, STATS_ROUND if stats else round_no)
        if reply.status == "error":
            # An error's sentence may name the node's image count or shape: it stays here.
            _log.warning("Round %s of job %s: %s", round_no, job.job_id, reply.reason)
            reply.reason = ("it could not compute its update (the reason is in the node's "
                            "log; secure aggregation keeps it from the coordinator)")
        if vector is not None and (np.shape(vector) != (length,)
                                   or not np.all(np.isfinite(vector))):
            reply = NodeReply("error", node.name, "its update holds NaN or infinite values "
                              "(or has the wrong length): not sent")
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
        stored_file = stored if stored and stored.exists() else None
        if stored_file is not None and not request.self_mask:
            # Without self masks the coordinator holds the sum of this active set as soon
            # as every vector arrives: the stored vector is revealed with this set, ever.
            bind_survivors(stored_file, request.active)
        tag = {"round": round_no, "file": str(stored_file) if stored_file else None}
        masked = session.masked_input(int(request.instance), request.active, vector,
                                      min_survivors=int(reply.privacy.get("secagg_threshold")
                                                        or 0), tag=tag,
                                      self_mask=request.self_mask)
        if reply.status == "ok":
            try:  # it leaves the node now: charged before it does
                node.charge_release(job.job_id, STATS_ROUND if stats else round_no)
            except BudgetExceededError as exc:
                meta.update(status="refused", reason=str(exc))
                return {"meta": pack(meta), "arrays": None}
        meta.update(secure={k: masked[k] for k in ("b_shares", "b_commit", "share_commits")
                            if k in masked})
        return {"meta": pack(meta), "arrays": {"y": masked["y"]}}
    except PrivmedError as exc:
        return _error(str(exc))
    except (KeyError, TypeError, ValueError, AttributeError):
        return _error("The 'train' message is malformed.")
