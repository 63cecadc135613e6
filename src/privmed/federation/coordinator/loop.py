"""The coordinator's job loop: rounds of aggregation, held-out evaluation, checkpoints.

Transport-free like the node: the Flower ServerApp hands it a :class:`Transport` over
its Grid. After every round the global model, the round table and the per-node privacy
figures go to ``OUT/checkpoint.pt`` (atomically), so ``resume=True`` continues after a
crash from the last finished round; nodes answer a repeated round from their stored
reply, so no ledger is charged twice. At the end ``OUT`` holds the same
``results.json`` / ``report.html`` / ``model.pt`` as ``privmed train``, plus the
per-round and per-site tables under ``federation``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privmed.data import ImageDataset
from privmed.errors import ConfigError, PrivmedError
from privmed.federation.config import FederationConfig
from privmed.federation.coordinator.results import build_federated_results
from privmed.federation.coordinator.secure import SecureAggregator
from privmed.federation.coordinator.strategies import Aggregator, PlainAggregator, strategy_for
from privmed.federation.messages import (
    Arrays,
    RoundRequest,
    Transport,
    load_arrays,
    state_to_arrays,
    trainable_keys,
)
from privmed.models import create_model
from privmed.training import evaluate
from privmed.training.checkpoint import load_checkpoint, save_checkpoint
from privmed.training.run_folder import RunFolder

ROUNDS_LOG = "rounds.jsonl"
# Settings a resumed job may change; anything else must match the checkpoint.
_RESUMABLE = {"round_timeout", "min_nodes"}


class FederationError(PrivmedError):
    """The federated job cannot go on (no nodes, every round failed, ...)."""

    exit_code = 5


def _to_tensors(arrays: Arrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


def _to_arrays(tensors: dict[str, torch.Tensor]) -> Arrays:
    return {k: v.numpy() for k, v in tensors.items()}


def wait_for_nodes(transport: Transport, minimum: int, timeout: float,
                   log: Callable[[str], None]) -> list[int]:
    """The connected nodes once at least ``minimum`` are there, or FederationError."""
    deadline = time.monotonic() + timeout
    announced = -1
    while True:
        nodes = sorted(transport.node_ids())
        if len(nodes) >= minimum:
            return nodes
        if len(nodes) != announced:
            log(f"Waiting for nodes: {len(nodes)} of {minimum} connected.")
            announced = len(nodes)
        if time.monotonic() > deadline:
            raise FederationError(f"Only {len(nodes)} of the {minimum} nodes needed connected "
                                  f"within {timeout:.0f} s; check that the nodes are running "
                                  "and can reach the coordinator.")
        time.sleep(0.5)


def run_federation(transport: Transport, job: FederationConfig, heldout: ImageDataset,
                   out: str | Path, *, aggregator: Aggregator | None = None,
                   resume: bool = False, node_wait: float = 120.0,
                   log: Callable[[str], None] = print, source: str = "federated sites"
                   ) -> dict[str, Any]:
    """Run ``job`` to the end; writes and returns the results (``privmed.results/1``)."""
    out = Path(out)
    if aggregator is None:
        aggregator = (SecureAggregator(job.job_id, job.secagg_threshold, strategy_for(job),
                                       log=log, optimistic=job.secagg_optimistic)
                      if job.secure_agg else PlainAggregator())
    folder = RunFolder(out, "federated run")
    folder.claim(resume=resume, need_checkpoint=True)
    ckpt = load_checkpoint(out)
    folder.create()
    torch.manual_seed(job.seed)
    rounds: list[dict] = []
    nodes_privacy: dict[str, dict] = {}
    # Secure aggregation (--dp local): the summed image count of the round with the most
    # contributors, the only count the coordinator learns ({"sites": [...], "examples": n}).
    secure_total: dict | None = None
    secure = aggregator.secure
    start_round, elapsed = 1, 0.0
    stats = None
    if ckpt is not None:
        saved = json.loads(ckpt["job"])
        changed = [k for k, v in job.to_dict().items()
                   if k not in _RESUMABLE and saved.get(k) != v]
        if changed:
            raise ConfigError(f"The checkpoint in {out} is of a different job "
                              f"({', '.join(changed)} differ); resume with the same options.")
        stats = json.loads(ckpt.get("stats") or "null")
        log(f"Resuming job {job.job_id} after round {ckpt['round']}.")
    else:
        (out / ROUNDS_LOG).unlink(missing_ok=True)
    user_job = job
    if job.normalize and job.input_mean is None:
        if stats is None:
            node_ids = wait_for_nodes(transport, job.min_nodes, node_wait, log)
            stats = _statistics(aggregator, transport, node_ids, job, heldout.image_shape[0], log)
        job = replace(job, input_mean=stats[0], input_std=stats[1])
    kwargs = job.model_kwargs(heldout.image_shape)
    model = create_model(job.model, heldout.image_shape[0], heldout.num_classes, **kwargs)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        rounds = json.loads(ckpt["rounds"])
        nodes_privacy = json.loads(ckpt["nodes"])
        secure_total = json.loads(ckpt.get("secure_total") or "null")
        start_round, elapsed = int(ckpt["round"]) + 1, float(ckpt["seconds"])
        if ckpt.get("aggregator") is not None:
            aggregator.load_state_dict(ckpt["aggregator"])

    arrays = state_to_arrays(model)  # what the nodes train from next (the model may differ)
    if ckpt is not None and ckpt.get("iterate") is not None:
        arrays = _to_arrays(ckpt["iterate"])
    trainable = trainable_keys(model)
    for round_no in range(start_round, job.rounds + 1):
        t0 = time.perf_counter()
        # All expected nodes must be there to start; later rounds go on with whoever is
        # connected (a node that died or refused is reported, not waited for).
        needed = job.min_nodes if round_no == start_round else 1
        node_ids = wait_for_nodes(transport, needed, node_wait, log)
        request = RoundRequest(round_no, job, arrays, trainable=trainable)
        for attempt in range(job.round_retries + 1):
            outcome = aggregator.run_round(transport, node_ids, request, job.round_timeout)
            if outcome.arrays is not None or not outcome.retryable:
                break
            if attempt < job.round_retries:
                log(f"Round {round_no} could not be recovered; trying it again "
                    f"({attempt + 1} of {job.round_retries}).")
                node_ids = wait_for_nodes(transport, 1, node_wait, log)
        table = []
        for reply in outcome.replies.values():
            # Under secure aggregation a node's count is hidden (null), never 0.
            row = {"node": reply.node, "status": reply.status, "reason": reply.reason,
                   "num_examples": None if secure else reply.num_examples,
                   "replayed": reply.replayed,
                   **{k: reply.metrics.get(k) for k in ("loss", "val_auc", "seconds",
                                                        "bytes_down", "bytes_up")},
                   "epsilon": reply.privacy.get("epsilon")}
            table.append(row)
            # A reply with privacy figures was released (and charged) even when its round
            # failed: the job's epsilon counts it.
            if isinstance(reply.privacy, dict) and reply.privacy.get("enabled"):
                nodes_privacy[reply.node] = dict(reply.privacy)
            if reply.status != "ok":
                log(f"Round {round_no}: node {reply.node} {reply.status}: {reply.reason}")
        if outcome.arrays is not None:
            arrays = outcome.arrays
            if outcome.total_examples is not None:
                trained = sorted(r.node for r in outcome.replies.values() if r.status == "ok")
                if secure_total is None or set(trained) >= set(secure_total["sites"]):
                    secure_total = {"sites": trained, "examples": outcome.total_examples}
            load_arrays(model, outcome.evaluated if outcome.evaluated is not None else arrays)
        else:
            log(f"Round {round_no} FAILED: no update could be aggregated; the global model is "
                "unchanged and the next round proceeds.")
        m = _evaluate(model, heldout)
        record = {"round": round_no, "status": "ok" if outcome.arrays is not None else "failed",
                  "contributors": len(outcome.contributors), "heldout_auc": m.get("roc_auc"),
                  "heldout_accuracy": m["accuracy"],
                  "seconds": round(time.perf_counter() - t0, 3), "nodes": table}
        rounds.append(record)
        elapsed += record["seconds"]
        save_checkpoint(out, {"job": json.dumps(user_job.to_dict()), "round": round_no,
                              "model": {k: v.detach().clone()
                                        for k, v in model.state_dict().items()},
                              "iterate": _to_tensors(arrays), "rounds": json.dumps(rounds),
                              "nodes": json.dumps(nodes_privacy), "seconds": elapsed,
                              "stats": json.dumps(stats),
                              "secure_total": json.dumps(secure_total),
                              "aggregator": aggregator.state_dict()})
        with open(out / ROUNDS_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: v for k, v in record.items()}) + "\n")
        log(f"Round {round_no}/{job.rounds}: {record['contributors']} of {len(node_ids)} nodes, "
            f"held-out ROC-AUC {_f(record['heldout_auc'])}, {record['seconds']:.1f} s.")
    if not any(r["status"] == "ok" for r in rounds):
        raise FederationError("Every round failed: no node contributed an update; see the "
                              "coordinator's log for each node's reason.")
    results = build_federated_results(job, model, heldout, rounds, nodes_privacy, elapsed,
                                      source, aggregator.name, secure_total)
    return folder.finish(model, results, name=job.model, kwargs=kwargs,
                         meta={"job_id": job.job_id})


def _statistics(aggregator: Aggregator, transport: Transport, node_ids: list[int],
                job: FederationConfig, channels: int, log: Callable[[str], None]
                ) -> tuple[list[float], list[float]]:
    """The sites' pixel mean/std (with DP), tried like a round; the job stops without it."""
    for attempt in range(job.round_retries + 1):
        stats = aggregator.statistics(transport, node_ids, job, channels, job.round_timeout)
        if stats is not None:
            log("Normalisation statistics over all sites: mean "
                f"{', '.join(f'{v:.3f}' for v in stats[0])}, std "
                f"{', '.join(f'{v:.3f}' for v in stats[1])}.")
            return stats
        if attempt < job.round_retries:
            log("The normalisation statistics could not be aggregated; trying again.")
    raise FederationError("The sites' normalisation statistics could not be aggregated "
                          f"after {job.round_retries + 1} tries; see each node's reason above "
                          "(or run with --no-normalize).")


def _evaluate(model: torch.nn.Module, data: ImageDataset) -> dict:
    """Held-out metrics; a fixed front end's features are computed once per run, not per
    round (same numbers)."""
    fixed = getattr(model, "fixed_features", None)
    if fixed is not None:
        from privmed.training.features import fixed_feature_dataset

        return evaluate(model.head, fixed_feature_dataset(fixed, data))
    return evaluate(model, data)


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
