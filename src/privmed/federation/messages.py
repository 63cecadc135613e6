"""What nodes and the coordinator say to each other: the one vocabulary both sides share.

A :class:`RoundRequest` goes to every selected node, a :class:`NodeReply` comes back, a
:class:`Transport` moves them (Flower in deployment, direct calls in process), and an
aggregator turns the replies into a :class:`RoundOutcome`. The vectors a node masks under
secure aggregation are laid out here too (``flatten_update``, the statistics vector), so
that the node that writes them and the coordinator that reads their sum agree on one
definition. Nothing here imports torch: Flower's ClientApp processes import this module.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from privmed.federation.config import FederationConfig
from privmed.federation.secagg.encoding import FixedPoint

if TYPE_CHECKING:
    import torch

Arrays = dict[str, np.ndarray]

# Public scale of the weights: n / K stays well inside the ring for sites up to ~10^5.
WEIGHT_SCALE = 1000.0
# Distributed DP's vectors are divided by this before fixed-point encoding so that gradient
# sums of large batches stay inside the encoding's clip range.
VECTOR_SCALE = 1000.0
# Ring and precision: 1024 nodes x |value| <= 64 x 2^20 stays below 2^61.
ENCODING = FixedPoint(clip=64.0, frac_bits=20, modulus_bits=62, max_parties=1024)
STATS_ROUND = 0  # the statistics use round number 0 for their masks: rounds start at 1


# ----------------------------------------------------------------------------- requests

@dataclass
class RoundRequest:
    """What every selected node receives for one round. ``phase``: "train", or "stats"
    (the normalisation statistics, round 0, no weights); ``trainable``: the parameters the
    job trains (a fixed front end's buffers never change, so they are not sent back);
    ``active`` / ``instance``: the secure round's active nodes and one-time mask key;
    ``self_mask=False``: an optimistic secure round, summed without an unmasking step
    (``secagg.node.SecAggNode.masked_input``)."""

    round: int
    job: FederationConfig
    arrays: Arrays
    phase: Literal["train", "stats"] = "train"
    trainable: list[str] | None = None
    active: list[int] | None = None
    instance: int | None = None
    self_mask: bool = True

    @property
    def secure(self) -> bool:
        return self.active is not None

    def to_wire(self) -> dict[str, Any]:
        """The job record with the request's own keys beside it (JSON-serialisable)."""
        extra = {"phase": self.phase, "trainable": self.trainable,
                 "secure_active": self.active, "secure_instance": self.instance,
                 "secure_self_mask": None if self.self_mask else False}
        return {**self.job.to_record(), **{k: v for k, v in extra.items() if v is not None}}

    @classmethod
    def from_wire(cls, round_no: int, record: dict[str, Any],
                  arrays: Arrays | None) -> RoundRequest:
        job, extra = FederationConfig.split_record(record)
        phase = extra.get("phase", "train")
        if phase not in ("train", "stats"):
            raise ValueError(f"unknown phase {phase!r}")
        self_mask = extra.get("secure_self_mask", True)
        if not isinstance(self_mask, bool):
            raise ValueError("secure_self_mask must be true or false")
        return cls(int(round_no), job, arrays or {}, phase, extra.get("trainable"),
                   extra.get("secure_active"), extra.get("secure_instance"), self_mask)


def stats_request(job: FederationConfig) -> RoundRequest:
    """The request (round 0, no weights) that asks every node for its statistics."""
    return RoundRequest(STATS_ROUND, job, {}, phase="stats")


@dataclass
class NodeReply:
    """What a node sends back for one round (``arrays`` only when ``status == 'ok'``)."""

    status: Literal["ok", "refused", "error"]
    node: str = ""
    reason: str = ""
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    replayed: bool = False
    arrays: Arrays | None = None
    secure: dict[str, Any] | None = None  # secure aggregation: encrypted shares to route

    def meta(self) -> dict[str, Any]:
        """Everything but the weights, JSON-serialisable."""
        return {k: v for k, v in asdict(self).items() if k not in ("arrays", "secure")}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], arrays: Arrays | None) -> NodeReply:
        allowed = {k: meta[k] for k in ("status", "node", "reason", "num_examples", "metrics",
                                         "privacy", "replayed", "secure") if k in meta}
        if allowed.get("status") not in ("ok", "refused", "error"):
            raise ValueError(f"unknown reply status {allowed.get('status')!r}")
        return cls(**allowed, arrays=arrays)


@dataclass
class RoundOutcome:
    arrays: Arrays | None  # None: no node contributed, the global model is unchanged
    replies: dict[int, NodeReply] = field(default_factory=dict)
    retryable: bool = False  # the round could not be recovered; trying again may succeed
    evaluated: Arrays | None = None  # the model to evaluate and save, when not ``arrays``
    # Secure aggregation, --dp local: the contributors' image count, summed with their
    # updates (the one count the coordinator learns); None where it learns none.
    total_examples: int | None = None

    @property
    def contributors(self) -> list[int]:
        return [n for n, r in self.replies.items() if r.status == "ok"]


class Transport(Protocol):
    """Moves round requests to nodes and their replies back (Flower in deployment)."""

    def node_ids(self) -> list[int]:
        """The nodes connected now."""
        ...

    def train(self, node_ids: list[int], request: RoundRequest,
              timeout: float) -> dict[int, NodeReply]:
        """Send ``request`` to each node and wait for the replies; a node that fails,
        or does not answer within ``timeout`` seconds, gets an ``error`` reply."""
        ...

    def exchange(self, kind: str, payloads: dict[int, str], round_no: int, timeout: float
                 ) -> dict[int, tuple[str | None, Arrays | None]]:
        """A protocol message (e.g. secure aggregation's) to each node; replies are
        ``(meta JSON, arrays)``, ``(None, None)`` for a node that failed or was silent."""
        ...


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


# ----------------------------------------------------------------------------- weights

def state_to_arrays(model: torch.nn.Module) -> Arrays:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_arrays(model: torch.nn.Module, arrays: Arrays) -> None:
    """Load wire arrays into ``model``; a mismatch is a clear ConfigError."""
    import torch

    from privmed.errors import ConfigError

    own = model.state_dict()
    if set(own) != set(arrays):
        raise ConfigError("The job's model does not match this node's model: different "
                          "parameter names.")
    for key, value in arrays.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ConfigError(f"The job's model does not fit this node's data: parameter {key} "
                              f"has shape {tuple(value.shape)}, here {tuple(own[key].shape)} "
                              "(different image size or classes?).")
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def trainable_keys(model: torch.nn.Module) -> list[str]:
    """State-dict names of the parameters DP-SGD trains (a fixed front end has none)."""
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- vector layout

def _float_keys(arrays: Arrays) -> list[str]:
    return sorted(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating))


def keys_of(base: Arrays, trainable: list[str] | None) -> list[str]:
    """The arrays that training changes: the coordinator names them (a fixed front end's
    buffers never change, so they are not sent); all float arrays otherwise."""
    from privmed.federation.secagg.protocol import ProtocolError

    if trainable is None:
        return _float_keys(base)
    missing = [k for k in trainable if k not in base]
    if missing:
        raise ProtocolError(f"The round names parameters the model lacks: {missing[:3]}.")
    return sorted(trainable)


def flatten_update(trained: Arrays, base: Arrays, num_examples: int,
                   trainable: list[str] | None = None) -> np.ndarray:
    """A local-DP node's masked vector ``[n * (w - w_global) / K, n / K]``: its
    examples-weighted model change and its weight (``K`` = WEIGHT_SCALE)."""
    parts = [((trained[k].astype(np.float64) - base[k].astype(np.float64)) * num_examples
              / WEIGHT_SCALE).ravel() for k in keys_of(base, trainable)]
    return np.concatenate([*parts, [num_examples / WEIGHT_SCALE]])


def vector_length(base: Arrays, trainable: list[str] | None = None) -> int:
    """Length of a round's vector: the trained values plus one weight (examples or the
    expected batch size)."""
    return sum(base[k].size for k in keys_of(base, trainable)) + 1


def stats_length(channels: int) -> int:
    """Length of a node's statistics vector: sums of means, of mean squares, the count."""
    return 2 * channels + 1


def statistics_from_sum(total: np.ndarray, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) from the summed statistics vectors, kept in sane ranges."""
    total = np.asarray(total, dtype=np.float64) * VECTOR_SCALE
    count = max(float(total[-1]), 1.0)
    mean = np.clip(total[:channels] / count, 0.0, 1.0)
    square = np.clip(total[channels:2 * channels] / count, 0.0, 1.0)
    std = np.clip(np.sqrt(np.maximum(square - mean ** 2, 0.0)), 0.02, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]
