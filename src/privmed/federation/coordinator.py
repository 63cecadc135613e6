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

from privmed import __version__
from privmed.data import ImageDataset
from privmed.errors import ConfigError, PrivmedError
from privmed.federation.aggregation import Aggregator, FedAvg, RoundRequest, Transport
from privmed.federation.config import FederationConfig
from privmed.federation.distributed import trainable_keys
from privmed.federation.node import Arrays, load_arrays, state_to_arrays
from privmed.models import count_parameters, create_model, save_model
from privmed.privacy import compute_epsilon, epsilon_curve, history_from_json, history_to_json
from privmed.report import SCHEMA_VERSION, environment_info, write_report, write_results
from privmed.training import evaluate
from privmed.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

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
        if job.secure_agg:
            from privmed.federation.secure_aggregator import SecureAggregator

            aggregator = SecureAggregator(job.job_id, job.secagg_threshold, log=log)
        else:
            aggregator = FedAvg()
    if (out / "results.json").exists():
        raise ConfigError(f"{out} already holds a finished run; choose another --out.")
    ckpt = load_checkpoint(out)
    if ckpt is not None and not resume:
        raise ConfigError(f"{out} already holds an unfinished federated run; pass --resume "
                          "to continue it or choose another --out.")
    if ckpt is None and resume:
        raise ConfigError(f"Nothing to resume: no checkpoint in {out}.")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(job.seed)
    rounds: list[dict] = []
    nodes_privacy: dict[str, dict] = {}
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
        start_round, elapsed = int(ckpt["round"]) + 1, float(ckpt["seconds"])
        if ckpt.get("aggregator") is not None and hasattr(aggregator, "load_state_dict"):
            aggregator.load_state_dict(ckpt["aggregator"])

    arrays = state_to_arrays(model)  # what the nodes train from next (the model may differ)
    if ckpt is not None and ckpt.get("iterate") is not None:
        arrays = _to_arrays(ckpt["iterate"])
    config = {**job.to_record(), "trainable": trainable_keys(model)}
    for round_no in range(start_round, job.rounds + 1):
        t0 = time.perf_counter()
        # All expected nodes must be there to start; later rounds go on with whoever is
        # connected (a node that died or refused is reported, not waited for).
        needed = job.min_nodes if round_no == start_round else 1
        node_ids = wait_for_nodes(transport, needed, node_wait, log)
        request = RoundRequest(round_no, config, arrays)
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
            row = {"node": reply.node, "status": reply.status, "reason": reply.reason,
                   "num_examples": reply.num_examples, "replayed": reply.replayed,
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
                              "aggregator": aggregator.state_dict()
                              if hasattr(aggregator, "state_dict") else None})
        with open(out / ROUNDS_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: v for k, v in record.items()}) + "\n")
        log(f"Round {round_no}/{job.rounds}: {record['contributors']} of {len(node_ids)} nodes, "
            f"held-out ROC-AUC {_f(record['heldout_auc'])}, {record['seconds']:.1f} s.")
    if not any(r["status"] == "ok" for r in rounds):
        raise FederationError("Every round failed: no node contributed an update; see the "
                              "coordinator's log for each node's reason.")
    results = build_federated_results(job, model, heldout, rounds, nodes_privacy, elapsed,
                                      source, aggregator.name,
                                      getattr(aggregator, "total_examples", None))
    save_model(out / "model.pt", model, name=job.model, kwargs=kwargs,
               class_names=heldout.class_names, image_shape=heldout.image_shape,
               meta={"privacy": {k: results["privacy"][k] for k in
                                 ("enabled", "epsilon", "delta", "accountant")},
                     "job_id": job.job_id})
    write_results(out, results)
    write_report(out)
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    return results


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
        from privmed.training.fit import fixed_feature_dataset

        return evaluate(model.head, fixed_feature_dataset(fixed, data))
    return evaluate(model, data)


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _node_history(p: dict) -> list[tuple[float, float, int]] | None:
    """A node's accountant history; None under secure aggregation, where a node sends only
    its epsilon (sigma and q would give away its image count)."""
    if "history" in p:
        return history_from_json(p["history"])
    if "noise_multiplier" in p and "sample_rate" in p:
        return [(p["noise_multiplier"], p["sample_rate"], p["steps"] * p["rounds_trained"])]
    return None


def federated_privacy(job: FederationConfig, nodes: dict[str, dict]) -> dict[str, Any]:
    """The ``privacy`` block: the largest per-node epsilon, each node's listed."""
    if not job.private or not nodes:
        return {"enabled": False, "epsilon": None, "delta": None, "accountant": None,
                "target_epsilon": None, "noise_multiplier": None, "max_grad_norm": None,
                "sample_rate": None, "history": [], "epsilon_curve": [], "ledger": None,
                "mode": job.dp, "per_node": []}
    per_node = []
    for name, p in sorted(nodes.items(), key=lambda item: _natural(item[0])):
        history = _node_history(p)
        eps = (compute_epsilon(history, p["delta"], p["accountant"]) if history is not None
               else float(p["epsilon"]))
        per_node.append({"node": name, "epsilon": eps, "delta": p["delta"],
                         "noise_multiplier": p.get("noise_multiplier"),
                         "sample_rate": p.get("sample_rate"),
                         "rounds_trained": p.get("rounds_trained"),
                         "ledger_remaining_epsilon": p.get("ledger_remaining_epsilon")})
    worst = max(per_node, key=lambda r: r["epsilon"])
    p = nodes[worst["node"]]
    history = _node_history(p)
    curve = ([] if history is None else
             [{"steps": s, "epsilon": e} for s, e in
              epsilon_curve(history, p["delta"], p["accountant"])])
    return {"enabled": True, "epsilon": worst["epsilon"], "delta": p["delta"],
            "accountant": p["accountant"], "target_epsilon": job.epsilon,
            "noise_multiplier": p.get("noise_multiplier"), "max_grad_norm": job.max_grad_norm,
            "sample_rate": p.get("sample_rate"),
            "history": [] if history is None else history_to_json(history),
            "epsilon_curve": curve, "ledger": None, "mode": job.dp,
            "worst_node": worst["node"], "per_node": per_node}


def build_federated_results(job: FederationConfig, model: torch.nn.Module,
                            heldout: ImageDataset, rounds: list[dict], nodes: dict[str, dict],
                            seconds: float, source: str, aggregator: str,
                            total_examples: int | None = None) -> dict[str, Any]:
    privacy = federated_privacy(job, nodes)
    per_round = 1 if job.distributed else job.local_epochs  # FedSGD steps or local epochs
    epochs = [{"epoch": r["round"], "steps": r["round"] * per_round,
               "loss": _mean([n["loss"] for n in r["nodes"] if n["status"] == "ok"]),
               "val_auc": r["heldout_auc"], "val_accuracy": r["heldout_accuracy"],
               "epsilon": _round_epsilon(r), "seconds": r["seconds"]} for r in rounds]
    if privacy["enabled"] and not privacy["epsilon_curve"]:
        # Secure aggregation: nodes send only their epsilon, so the curve is per round.
        privacy["epsilon_curve"] = [{"steps": e["steps"], "epsilon": e["epsilon"]}
                                    for e in epochs if e["epsilon"] is not None]
    sites: dict[str, dict] = {}
    for r in rounds:
        for n in r["nodes"]:
            site = sites.setdefault(n["node"], {"node": n["node"], "rounds_ok": 0,
                                                "rounds_refused": 0, "rounds_failed": 0,
                                                "num_examples": n["num_examples"]})
            key = {"ok": "rounds_ok", "refused": "rounds_refused"}.get(n["status"],
                                                                       "rounds_failed")
            site[key] += 1
    for row in privacy.get("per_node", []):
        sites.setdefault(row["node"], {"node": row["node"]})["epsilon"] = row["epsilon"]
    return {
        "schema": SCHEMA_VERSION, "privmed_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": None, "seed": job.seed, "run_id": job.job_id,
        "data": {"source": source, "dataset_id": heldout.dataset_id,
                 "classes": list(heldout.class_names), "image_shape": list(heldout.image_shape),
                 "sizes": {"train": max(1, total_examples or sum(
                     s.get("num_examples", 0) for s in sites.values())),
                           "test": len(heldout)}},
        "model": {"name": job.model, "parameters": count_parameters(model)},
        "training": {"config": job.to_dict(), "epochs": epochs, "seconds": round(seconds, 3),
                     "per_round": "one entry per federated round; val_* is the global "
                                  "model on the coordinator's held-out set"},
        "privacy": privacy,
        "metrics": {"test": evaluate(model, heldout)},
        "federation": {"aggregator": aggregator, "rounds": rounds,
                       "sites": sorted(sites.values(), key=lambda s: _natural(s["node"]))},
        "environment": environment_info(),
    }


def _natural(name: str) -> list:
    """'site-2' before 'site-10'."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _round_epsilon(r: dict) -> float | None:
    eps = [n["epsilon"] for n in r["nodes"] if n.get("epsilon") is not None]
    return max(eps) if eps else None
