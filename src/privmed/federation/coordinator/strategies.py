"""How the coordinator turns the nodes' updates into the next global model.

Two questions, answered separately: *what the coordinator may see* (an
:class:`Aggregator`: every node's update, :class:`PlainAggregator`, or only their sum,
``coordinator.secure.SecureAggregator``) and *what it does with it* (a strategy:
:class:`FedAvg`, the examples-weighted mean of the nodes' models, or :class:`FedSGD`, one
server-optimiser step on the nodes' summed noisy gradients). Either aggregator wraps
either strategy that can use what it sees: FedSGD's shares carry only part of the noise,
so it runs only under secure aggregation.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from privmed.federation.config import FederationConfig
from privmed.federation.messages import (
    VECTOR_SCALE,
    WEIGHT_SCALE,
    Arrays,
    NodeReply,
    RoundOutcome,
    RoundRequest,
    Transport,
    keys_of,
    statistics_from_sum,
    stats_length,
    stats_request,
)
from privmed.training import TrainConfig
from privmed.training.fit import make_optimizer, make_scheduler


class Aggregator(Protocol):
    """Runs a round (or the statistics) over a transport; ``secure``: it sees only sums."""

    name: str
    secure: bool

    def run_round(self, transport: Transport, node_ids: list[int],
                  request: RoundRequest, timeout: float) -> RoundOutcome:
        ...

    def statistics(self, transport: Transport, node_ids: list[int], job: FederationConfig,
                   channels: int, timeout: float) -> tuple[list[float], list[float]] | None:
        """Per-channel pixel (mean, std) over all sites, or None when it failed."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


# ----------------------------------------------------------------------------- strategies

class FedAvg:
    """Examples-weighted mean of the nodes' models (McMahan et al. 2017)."""

    name = "fedavg"

    def combine(self, request: RoundRequest, updates: list[tuple[Arrays, int]]
                ) -> RoundOutcome:
        """From every node's model and example count (plain aggregation)."""
        return RoundOutcome(weighted_mean(updates) if updates else None)

    def from_sum(self, request: RoundRequest, total: np.ndarray) -> RoundOutcome:
        """From ``sum(n * (w - w_global) / K)`` and ``sum(n / K)`` (``messages.flatten_update``):
        ``w_global += sum(n * delta) / sum(n)``; the summed count is the one it learns."""
        weight = total[-1] * WEIGHT_SCALE
        if weight <= 0.5:  # no node trained (all refused or failed)
            return RoundOutcome(None)
        new, offset = {k: v.copy() for k, v in request.arrays.items()}, 0
        for key in keys_of(request.arrays, request.trainable):
            base = request.arrays[key]
            delta = total[offset:offset + base.size] * WEIGHT_SCALE / weight
            new[key] = (base.astype(np.float64) + delta.reshape(base.shape)).astype(base.dtype)
            offset += base.size
        return RoundOutcome(new, total_examples=round(weight))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": None}  # FedAvg keeps no state between rounds

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FedSGD:
    """One server-optimiser step per round on the nodes' summed noisy gradients, as central
    training steps (post-processing: no privacy cost): the same optimiser and schedule
    (Adam, cosine-decayed over the job's rounds) and an exponential moving average of the
    iterates (decay ``ema_decay``, TrainConfig's default) as the model that is evaluated
    and saved; the nodes keep computing gradients at the iterate."""

    name = "fedsgd"

    def __init__(self, ema_decay: float | None = TrainConfig.ema_decay) -> None:
        self.ema_decay = ema_decay
        self.ema: list[np.ndarray] | None = None
        self.trainable: list[str] = []
        self.params: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._state: dict[str, Any] | None = None

    def _start(self, request: RoundRequest) -> None:
        job = request.job
        config = TrainConfig(epochs=max(job.rounds, 1), lr=job.lr, ema_decay=self.ema_decay)
        self.trainable = list(request.trainable or [])
        self.params = [nn.Parameter(torch.from_numpy(
            np.array(request.arrays[k], dtype=np.float32))) for k in self.trainable]
        self.optimizer = make_optimizer(self.params, config)
        self.scheduler = make_scheduler(self.optimizer, config, config.epochs)
        if self._state is not None:
            self.optimizer.load_state_dict(self._state["optimizer"])
            self.scheduler.load_state_dict(self._state["scheduler"])
            ema = self._state.get("ema")
            self.ema = None if ema is None else [e.numpy().astype(np.float64) for e in ema]

    def from_sum(self, request: RoundRequest, total: np.ndarray) -> RoundOutcome:
        """From the sum of the nodes' ``[noisy gradient sum, expected batch]`` vectors."""
        if self.optimizer is None:
            self._start(request)
        assert self.optimizer is not None
        arrays = request.arrays
        total = np.asarray(total, dtype=np.float64) * VECTOR_SCALE
        batch = float(total[-1])
        if batch <= 0.5:  # every node refused: nothing was sampled
            return RoundOutcome(None)
        with torch.no_grad():
            offset = 0
            for key, param in zip(self.trainable, self.params, strict=True):
                param.copy_(torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)))
                size = param.numel()
                param.grad = torch.from_numpy(
                    (total[offset:offset + size] / batch).reshape(param.shape)).float()
                offset += size
        self.optimizer.step()
        self.scheduler.step()
        new = dict(arrays)
        for key, param in zip(self.trainable, self.params, strict=True):
            new[key] = param.detach().numpy().astype(arrays[key].dtype).copy()
        current = [new[k].astype(np.float64) for k in self.trainable]
        if self.ema is None or self.ema_decay is None:  # as AveragedModel: the first copies
            self.ema = current
        else:
            d = self.ema_decay
            self.ema = [d * e + (1 - d) * c for e, c in zip(self.ema, current, strict=True)]
        evaluated = dict(new)
        for key, value in zip(self.trainable, self.ema, strict=True):
            evaluated[key] = value.astype(arrays[key].dtype)
        return RoundOutcome(new, evaluated=evaluated)

    def state_dict(self) -> dict[str, Any]:
        """The server optimiser (as a checkpoint holds it: tensors, not numpy, since
        checkpoints are read with torch.load(weights_only=True)); None before round 1."""
        if self.optimizer is None:
            return {"optimizer": self._state}
        return {"optimizer": {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else [torch.from_numpy(e) for e in self.ema]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state.get("optimizer")


Strategy = FedAvg | FedSGD


def strategy_for(job: FederationConfig) -> Strategy:
    """FedSGD for distributed DP (the nodes send noisy gradient shares), FedAvg otherwise."""
    return FedSGD() if job.distributed else FedAvg()


# ----------------------------------------------------------------------------- plain

def check_update(reply: NodeReply, reference: Arrays) -> str | None:
    """Why a node's returned weights cannot be aggregated, or None when they can."""
    if reply.arrays is None:
        return "it sent no weights"
    if set(reply.arrays) != set(reference):
        return "its weights have different parameter names"
    for key, ref in reference.items():
        value = reply.arrays[key]
        if value.shape != ref.shape:
            return f"parameter {key} has shape {value.shape}, expected {ref.shape}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"parameter {key} holds NaN or infinite values"
    if reply.num_examples < 1:
        return "it reported no training examples"
    return None


def weighted_mean(updates: list[tuple[Arrays, int]]) -> Arrays:
    """Examples-weighted mean of the nodes' weights (FedAvg, McMahan et al. 2017).

    Integer buffers (e.g. counters) are taken from the largest node rather than averaged.
    """
    total = sum(n for _, n in updates)
    first = updates[0][0]
    out: Arrays = {}
    for key, ref in first.items():
        if np.issubdtype(ref.dtype, np.floating):
            acc = np.zeros(ref.shape, dtype=np.float64)
            for arrays, n in updates:
                acc += arrays[key].astype(np.float64) * (n / total)
            out[key] = acc.astype(ref.dtype)
        else:
            out[key] = max(updates, key=lambda u: u[1])[0][key].copy()
    return out


class WrapsStrategy:
    """An aggregator whose state (for a resumed job) is its strategy's."""

    strategy: Strategy

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)


class PlainAggregator(WrapsStrategy):
    """The coordinator sees every node's model (no secure aggregation): FedAvg only."""

    secure = False

    def __init__(self, strategy: FedAvg | None = None) -> None:
        self.strategy = strategy or FedAvg()
        self.name = self.strategy.name

    def statistics(self, transport: Transport, node_ids: list[int], job: FederationConfig,
                   channels: int, timeout: float) -> tuple[list[float], list[float]] | None:
        """Sum of the nodes' (each fully noised) statistics vectors."""
        replies = transport.train(node_ids, stats_request(job), timeout)
        vectors = [r.arrays["stats"] for r in replies.values()
                   if r.status == "ok" and r.arrays and "stats" in r.arrays
                   and np.shape(r.arrays["stats"]) == (stats_length(channels),)]
        return statistics_from_sum(np.sum(vectors, axis=0), channels) if vectors else None

    def run_round(self, transport: Transport, node_ids: list[int],
                  request: RoundRequest, timeout: float) -> RoundOutcome:
        replies = transport.train(node_ids, request, timeout)
        usable: list[tuple[Arrays, int]] = []
        for node_id, reply in replies.items():
            if reply.status != "ok":
                continue
            problem = check_update(reply, request.arrays)
            if problem is not None:
                replies[node_id] = NodeReply("error", reply.node, f"update excluded: {problem}",
                                             reply.num_examples, reply.metrics, reply.privacy)
                continue
            usable.append((reply.arrays, reply.num_examples))
        outcome = self.strategy.combine(request, usable)
        outcome.replies = replies
        return outcome
