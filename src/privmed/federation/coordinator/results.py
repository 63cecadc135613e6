"""The ``results.json`` of a federated job: only what the coordinator legitimately knows.

Per site the coordinator knows its status each round, its ε and δ and the rounds it took
part in. Under secure aggregation it never learns a site's image count, σ, q, history,
loss or remaining budget (they would give the image count away): those are ``null``
and listed in ``federation.hidden``, so that a reader (and the report) says "hidden"
rather than 0 or another site's figure. The headline (ε, δ) is the weakest site's: the
largest ε and the largest δ over the sites that took part, which holds for every one of
them. Each site's ledger stays at the site.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from privmed import __version__
from privmed.data import ImageDataset
from privmed.federation.config import FederationConfig
from privmed.models import count_parameters
from privmed.privacy import compute_epsilon, history_from_json
from privmed.report import SCHEMA_VERSION, environment_info
from privmed.report.federated import SECURE_HIDDEN
from privmed.training import evaluate
from privmed.training.run_folder import no_privacy

#: Where a site's ledger is, as the coordinator can say it: it never sees the ledger.
LEDGER_AT_SITE = "kept by the site"


def _node_history(p: dict) -> list[tuple[float, float, int]] | None:
    """A node's accountant history; None under secure aggregation, where a node sends only
    its epsilon (sigma and q would give away its image count)."""
    if "history" in p:
        return history_from_json(p["history"])
    if "noise_multiplier" in p and "sample_rate" in p:
        return [(p["noise_multiplier"], p["sample_rate"], p["steps"] * p["rounds_trained"])]
    return None


def _disabled(job: FederationConfig) -> dict[str, Any]:
    return no_privacy(mode=job.dp, per_node=[])


def federated_privacy(job: FederationConfig, nodes: dict[str, dict]) -> dict[str, Any]:
    """The ``privacy`` block: the weakest site's (ε, δ) as the headline, each site's own.

    ``nodes`` maps a site to the privacy figures of its latest released reply. σ, q and
    the history are per site (a site calibrates its own σ for its own q), so the job-level
    ``noise_multiplier``, ``sample_rate`` and ``history`` are null / empty.
    """
    if not job.private or not nodes:
        return _disabled(job)
    per_node = []
    for name, p in sorted(nodes.items(), key=lambda item: natural(item[0])):
        history = _node_history(p)
        eps = (compute_epsilon(history, p["delta"], p["accountant"]) if history is not None
               else float(p["epsilon"]))
        per_node.append({"node": name, "epsilon": eps, "delta": p["delta"],
                         "unit": p.get("unit") or "image",
                         "noise_multiplier": p.get("noise_multiplier"),
                         "sample_rate": p.get("sample_rate"),
                         "history": None if history is None else p.get("history"),
                         "rounds_trained": p.get("rounds_trained"),
                         "ledger_remaining_epsilon": p.get("ledger_remaining_epsilon")})
    worst = max(per_node, key=lambda r: r["epsilon"])
    widest = max(per_node, key=lambda r: r["delta"])
    # Per patient only if every site protected patients: one per-image site is the weakest.
    unit = "patient" if all(r["unit"] == "patient" for r in per_node) else "image"
    # (max ε, max δ) holds for every site: each is (ε_i, δ_i)-DP with both no larger.
    return {"enabled": True, "epsilon": worst["epsilon"], "delta": widest["delta"],
            "unit": unit, "units": None,
            "accountant": job.accountant, "target_epsilon": job.epsilon,
            "noise_multiplier": None, "max_grad_norm": job.max_grad_norm,
            "sample_rate": None, "history": [], "epsilon_curve": [], "ledger": None,
            "mode": job.dp, "headline": "weakest site: the largest ε and the largest δ over "
                                        f"the {len(per_node)} sites that took part",
            "worst_node": worst["node"], "delta_node": widest["node"],
            "sites": len(per_node), "per_node": per_node}


def _sites(rounds: list[dict], per_node: list[dict], secure: bool) -> list[dict]:
    """Per site: its rounds by outcome, its image count where it disclosed it, its (ε, δ)."""
    sites: dict[str, dict] = {}
    for r in rounds:
        for n in r["nodes"]:
            site = sites.setdefault(n["node"], {
                "node": n["node"], "num_examples": None, "rounds_ok": 0, "rounds_refused": 0,
                "rounds_failed": 0, "epsilon": None, "delta": None,
                "ledger": LEDGER_AT_SITE})
            key = {"ok": "rounds_ok", "refused": "rounds_refused"}.get(n["status"],
                                                                       "rounds_failed")
            site[key] += 1
            if not secure and n.get("num_examples"):  # plain FedAvg: each reply says it
                site["num_examples"] = n["num_examples"]
    for row in per_node:
        site = sites.setdefault(row["node"], {"node": row["node"], "num_examples": None,
                                              "rounds_ok": 0, "rounds_refused": 0,
                                              "rounds_failed": 0, "ledger": LEDGER_AT_SITE})
        site.update(epsilon=row["epsilon"], delta=row["delta"])
    return sorted(sites.values(), key=lambda s: natural(s["node"]))


def train_size(rounds: list[dict], sites: list[dict], secure: bool,
               secure_total: dict | None) -> int | None:
    """Images the global model was trained on, as far as the sites disclosed them.

    Plain FedAvg: the sum of the counts of the sites that trained at least once. Secure
    aggregation (``--dp local``): the securely summed count of a round in which every site
    that ever contributed did (``secure_total``: ``{"sites": [...], "examples": n}``); it
    is the only count the coordinator learns. None (hidden) otherwise, e.g. under
    distributed DP, whose sum holds expected batch sizes, not images."""
    trained = {n["node"] for r in rounds for n in r["nodes"] if n["status"] == "ok"}
    if not trained:
        return None
    if not secure:
        counts = [s["num_examples"] for s in sites if s["node"] in trained]
        return sum(counts) if all(c for c in counts) else None
    if secure_total and set(secure_total.get("sites", [])) == trained:
        return int(secure_total["examples"]) or None
    return None


def _epochs(job: FederationConfig, rounds: list[dict]) -> list[dict]:
    per_round = 1 if job.distributed else job.local_epochs  # FedSGD steps or local epochs
    latest: dict[str, float] = {}  # each site's epsilon so far: it never goes down
    epochs = []
    for r in rounds:
        for n in r["nodes"]:
            if n.get("epsilon") is not None:
                latest[n["node"]] = max(latest.get(n["node"], 0.0), n["epsilon"])
        epochs.append({"epoch": r["round"], "steps": r["round"] * per_round,
                       "loss": _mean([n["loss"] for n in r["nodes"] if n["status"] == "ok"]),
                       "val_auc": r["heldout_auc"], "val_accuracy": r["heldout_accuracy"],
                       "epsilon": max(latest.values()) if latest else None,
                       "seconds": r["seconds"]})
    return epochs


def build_federated_results(job: FederationConfig, model: torch.nn.Module,
                            heldout: ImageDataset, rounds: list[dict], nodes: dict[str, dict],
                            seconds: float, source: str, aggregator: str,
                            secure_total: dict | None = None) -> dict[str, Any]:
    """``privmed.results/1`` for a finished job (``aggregator``: ``"secagg"``/``"fedavg"``)."""
    secure = aggregator == "secagg"
    privacy = federated_privacy(job, nodes)
    epochs = _epochs(job, rounds)
    if privacy["enabled"]:  # the largest site epsilon after each round
        privacy["epsilon_curve"] = [{"steps": e["steps"], "round": e["epoch"],
                                     "epsilon": e["epsilon"]}
                                    for e in epochs if e["epsilon"] is not None]
    sites = _sites(rounds, privacy["per_node"], secure)
    train = train_size(rounds, sites, secure, secure_total)
    data: dict[str, Any] = {
        "source": source, "dataset_id": heldout.dataset_id,
        "classes": list(heldout.class_names), "image_shape": list(heldout.image_shape),
        "sizes": {"train": train, "test": len(heldout)}}
    if train is None:
        data["sizes_hidden"] = ["train"]
    return {
        "schema": SCHEMA_VERSION, "privmed_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": None, "seed": job.seed, "run_id": job.job_id,
        "data": data,
        "model": {"name": job.model, "parameters": count_parameters(model)},
        "training": {"config": job.to_dict(), "epochs": epochs, "seconds": round(seconds, 3),
                     "per_round": "one entry per federated round; val_* is the global "
                                  "model on the coordinator's held-out test set"},
        "privacy": privacy,
        "metrics": {"test": evaluate(model, heldout)},
        "federation": {"aggregator": aggregator, "rounds": rounds, "sites": sites,
                       "hidden": list(SECURE_HIDDEN) if secure else [],
                       "heldout": "the coordinator's held-out test set (metrics.test)"},
        "environment": environment_info(),
    }


def natural(name: str) -> list:
    """'site-2' before 'site-10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
