"""privmed's Flower ServerApp and ClientApp (Flower's Message API).

The ClientApp is deliberately thin: it imports only Flower and numpy, forwards the
round to the node's long-lived worker (``node.worker``) and returns its reply, because
Flower starts a new ClientApp process for every message. The ServerApp reads the job
file named in the run config and runs :func:`run_federation` over a
:class:`GridTransport`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from privmed.processes import die_with_parent

client_app = ClientApp()
server_app = ServerApp()

_POLL = 0.2  # Grid.send_and_receive sleeps 3 s between pulls; a round need not wait so




def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# ----------------------------------------------------------------------------- node side

_SIM_NODES: dict[tuple[str, int], Any] = {}  # per Ray actor: virtual sites already loaded


def _simulated_round(context: Context, request: dict[str, Any]) -> dict[str, Any]:
    """Simulation engine: Ray actors live across messages, so train in-process; the
    virtual site's data and ledger come from the job file, by partition id."""
    from pathlib import Path

    from privmed.federation.node.handler import handle_request
    from privmed.federation.node.site import SiteNode

    job_file = str(context.run_config["job-file"])
    site = int(context.node_config["partition-id"])
    key = (job_file, site)
    if key not in _SIM_NODES:
        spec = json.loads(Path(job_file).read_text(encoding="utf-8"))
        sim = spec["simulation"]
        ledger = sim["ledgers"][site]  # keyed to the site's data (federation.site_ledgers)
        _SIM_NODES[key] = SiteNode(sim["sites"][site], ledger=ledger,
                                   budget_epsilon=sim["budgets"][site], name=f"site-{site + 1}",
                                   max_sites=len(sim["sites"]) if len(sim["sites"]) > 1
                                   else None)
    node = _SIM_NODES[key]
    # Ray may hand a virtual node's messages to any actor: its secure-aggregation keys
    # travel in the node's own Context.state, which Flower keeps between its messages.
    if "secagg" in context.state:
        node.load_sessions(str(context.state["secagg"]["sessions"]))
    else:
        node.sessions = {}
    reply = handle_request(node, request)
    context.state["secagg"] = ConfigRecord({"sessions": node.dump_sessions()})
    return reply


def _serve(msg: Message, context: Context) -> Message:
    die_with_parent()
    node = context.node_config
    config = msg.content["config"]
    request = {"kind": str(config.get("kind", "train")), "job": str(config.get("job", "")),
               "round": int(config["round"]), "payload": str(config.get("payload", "")),
               "arrays": _from_record(msg.content["arrays"]) if "arrays" in msg.content
               else None}
    if "worker" in node:
        from privmed.federation.node.worker import ask_worker

        reply = ask_worker(str(node["worker"]), str(node["worker-key"]), request)
    else:
        reply = _simulated_round(context, request)
    content = RecordDict({"reply": ConfigRecord({"meta": reply["meta"]})})
    if reply.get("arrays") is not None:
        content["arrays"] = _to_record(reply["arrays"])
    return Message(content, reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return _serve(msg, context)


@client_app.query()
def query(msg: Message, context: Context) -> Message:  # secure-aggregation protocol steps
    return _serve(msg, context)


# ----------------------------------------------------------------------------- server side

class GridTransport:
    """privmed's Transport over a Flower Grid: push, then pull until replies or timeout."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.names: dict[int, str] = {}

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def _name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node {node_id}")

    def _send(self, contents: dict[int, RecordDict], message_type: str, group: str,
              timeout: float) -> tuple[dict[int, Message], dict[int, str]]:
        """Push one message per node, then pull replies until all came or ``timeout``."""
        node_ids = list(contents)
        messages = [Message(contents[n], dst_node_id=n, message_type=message_type,
                            group_id=group) for n in node_ids]
        ids = list(self.grid.push_messages(messages))
        got: dict[int, Message] = {}
        failed: dict[int, str] = {}
        waiting = {}
        for node_id, msg_id in zip(node_ids, ids, strict=True):
            if msg_id:
                waiting[msg_id] = node_id
            else:
                failed[node_id] = "the message could not be delivered"
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for msg in self.grid.pull_messages(list(waiting)):
                node_id = waiting.pop(msg.metadata.reply_to_message_id, None)
                if node_id is not None:
                    got[node_id] = msg
            if waiting:
                time.sleep(_POLL)
        for node_id in waiting.values():
            failed[node_id] = f"no reply within {timeout:.0f} s"
        return got, failed

    def train(self, node_ids: list[int], request: Any, timeout: float) -> dict[int, Any]:
        from privmed.federation.messages import NodeReply

        config = ConfigRecord({"job": json.dumps(request.to_wire()), "round": request.round})
        content = RecordDict({"arrays": _to_record(request.arrays), "config": config})
        down = sum(int(v.nbytes) for v in request.arrays.values())
        got, failed = self._send({n: content for n in node_ids}, "train", str(request.round),
                                 timeout)
        replies: dict[int, Any] = {n: self._decode(n, m, down) for n, m in got.items()}
        for node_id, why in failed.items():
            replies[node_id] = NodeReply("error", self._name(node_id), why)
        return replies

    def exchange(self, kind: str, payloads: dict[int, str], round_no: int, timeout: float
                 ) -> dict[int, tuple[str | None, dict | None]]:
        contents = {n: RecordDict({"config": ConfigRecord({
            "round": round_no, "kind": kind, "payload": p})})
            for n, p in payloads.items()}
        got, _ = self._send(contents, "query", f"{kind}-{round_no}", timeout)
        out: dict[int, tuple[str | None, dict | None]] = {}
        for n in payloads:
            msg = got.get(n)
            if msg is None or msg.has_error():
                out[n] = (None, None)
                continue
            arrays = _from_record(msg.content["arrays"]) if "arrays" in msg.content else None
            out[n] = (str(msg.content["reply"]["meta"]), arrays)
        return out

    def _decode(self, node_id: int, msg: Message, down: int) -> Any:
        from privmed.federation.messages import NodeReply

        if msg.has_error():
            reason = msg.error.reason or f"error code {msg.error.code}"
            return NodeReply("error", self._name(node_id), f"the node failed: {reason}")
        try:
            from privmed.federation.messages import unpack

            meta = unpack(str(msg.content["reply"]["meta"]))
            arrays = _from_record(msg.content["arrays"]) if "arrays" in msg.content else None
            reply = NodeReply.from_meta(meta, arrays)
        except (KeyError, ValueError, TypeError) as exc:
            return NodeReply("error", self._name(node_id), f"malformed reply ({exc})")
        if reply.node:
            self.names[node_id] = reply.node
        else:
            reply.node = self._name(node_id)
        reply.metrics = {**reply.metrics, "bytes_down": down,
                         "bytes_up": sum(int(v.nbytes) for v in (arrays or {}).values())}
        return reply


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from pathlib import Path

    die_with_parent()
    from privmed.data.evalset import load_eval_split
    from privmed.federation.config import FederationConfig
    from privmed.federation.coordinator.loop import run_federation

    spec = json.loads(Path(str(context.run_config["job-file"])).read_text(encoding="utf-8"))
    job = FederationConfig.from_record(spec["job"])
    held, _ = load_eval_split(spec["heldout"])  # its test split, or all of a file
    run_federation(GridTransport(grid), job, held, spec["out"], resume=spec.get("resume", False),
                   node_wait=float(spec.get("node_wait", 120.0)),
                   log=lambda line: print(f"[privmed] {line}", flush=True),
                   source=spec.get("source", "federated sites"))
