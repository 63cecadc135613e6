"""Distributed DP (Dopamine, Malekzadeh et al. 2021): each node adds a share of the noise.

Under secure aggregation with threshold ``t`` the coordinator only ever sees the sum of
at least ``t`` nodes' vectors. If every node adds Gaussian noise of standard deviation
``sigma * C / sqrt(t)``, that sum carries at least ``sigma * C``: the noise of one
central DP-SGD step, while each node added only ``1/sqrt(t)`` of it. Two releases work
this way:

* **one FedSGD step per round** (``--dp distributed``): the node Poisson-samples a batch
  (rate ``q = B / n``), clips every per-sample gradient to ``C`` and sends the noisy sum
  with its expected batch size; the coordinator divides the sum by the summed batch
  sizes and applies a server-side optimiser. The aggregate is exactly one DP-SGD step on
  the union of the sites' data, accounted per node as ``(sigma, q, 1)``.
* **normalisation statistics** (as PriMIA): per-channel sums of each image's pixel mean
  and mean square, and the image count; one Gaussian release ``(sigma_n, 1, 1)``.

The ledger records what left the node: a node *reserves* a release when it computes
it (refusing one that would overspend) and *commits* it when it sends it (masked:
``t`` peers then hold what completes the sum without it); a vector computed but never
sent is given back at the node's next round. A repeated request for a
round is answered with the stored vector, never fresh noise.

The guarantee assumes, as Dopamine does, that at least ``t`` nodes add their share
honestly (see docs/threat-model.md).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from privmed.errors import BudgetExceededError, ConfigError, PrivmedError
from privmed.federation.config import FederationConfig
from privmed.federation.node import (
    Arrays,
    NodeReply,
    SiteNode,
    load_arrays,
    load_stored_reply,
    store_reply,
)
from privmed.models import create_model
from privmed.privacy import (
    SecureRandom,
    calibrate_noise_multiplier,
    compute_epsilon,
    history_from_json,
    history_to_json,
)
from privmed.training.fit import fixed_feature_dataset

# Vectors are divided by this before fixed-point encoding so that gradient sums of
# large batches stay inside the encoding's clip range (same role as secure.WEIGHT_SCALE).
VECTOR_SCALE = 1000.0
STATS_ROUND = 0  # the statistics use round number 0 for their masks: rounds start at 1


def stats_run_id(job_id: str) -> str:
    return f"{job_id}-stats"


def round_run_id(job_id: str, round_no: int) -> str:
    return stats_run_id(job_id) if round_no == STATS_ROUND else f"{job_id}-round-{round_no}"


def stats_length(channels: int) -> int:
    """Length of a node's statistics vector: sums of means, of mean squares, the count."""
    return 2 * channels + 1


def stats_request(job: FederationConfig) -> Any:
    """The request (round 0, no weights) that asks every node for its statistics."""
    from privmed.federation.aggregation import RoundRequest

    return RoundRequest(STATS_ROUND, {**job.to_record(), "phase": "stats"}, {})


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict names of the parameters DP-SGD trains (a fixed front end has none)."""
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- node side

def _round_of(run_id: str, job_id: str) -> int | None:
    """The round of one of ``job_id``'s ledger entries (0: the statistics), matched
    exactly: job ``a`` must never take job ``a-b``'s entries for its own."""
    if run_id == stats_run_id(job_id):
        return STATS_ROUND
    match = re.fullmatch(re.escape(job_id) + r"-round-(\d+)", run_id)
    return int(match.group(1)) if match else None


def _ledger_entries(node: SiteNode, job: FederationConfig) -> dict[str, dict]:
    ledger = node._open_ledger(node.delta(job))
    return {e["run_id"]: e for e in ledger.entries(node.bundle.train.dataset_id)
            if _round_of(e["run_id"], job.job_id) is not None}


def released_rounds(node: SiteNode, job: FederationConfig) -> int:
    entries = _ledger_entries(node, job)
    return sum(1 for run, e in entries.items()
               if e["status"] == "committed" and _round_of(run, job.job_id) != STATS_ROUND)


def _reserve(node: SiteNode, job: FederationConfig, run_id: str,
             history: list[tuple[float, float, int]]) -> None:
    if node.ledger_path is None:
        raise ConfigError("This node has no ledger; it only takes DP jobs with a ledger "
                          "(start it with --ledger FILE --budget-epsilon E).")
    delta = node.delta(job)
    node._open_ledger(delta).reserve(node.bundle.train.dataset_id, run_id, history, delta,
                                     records=node.privacy_records())


def charge_release(node: SiteNode, job_id: str, round_no: int) -> None:
    """Charge ``round_no``'s release: the node is about to send it (in the clear, or
    masked: from then on ``t`` peers holding its self-mask shares can complete the sum
    without it, so the release is out of its hands). A reservation given back earlier is
    charged again (or refused, BudgetExceededError, and then nothing is sent)."""
    if node.ledger_path is None:
        return
    ledger = node._open_ledger()
    dataset = node.bundle.train.dataset_id
    run_id = round_run_id(job_id, round_no)
    entry = next((e for e in ledger.entries(dataset) if e["run_id"] == run_id), None)
    if entry is None or entry["status"] == "committed":
        return
    planned = history_from_json(entry["planned_history"])
    if entry["status"] == "released":
        ledger.reserve(dataset, run_id, planned, records=node.privacy_records())
    ledger.commit(run_id, planned, dataset)


def release_discarded(node: SiteNode, job: FederationConfig, before_round: int) -> None:
    """Give back the reservations of earlier rounds whose vector this node computed but
    never sent (a sent one is charged at once): no sum can hold it."""
    if node.ledger_path is None or not job.distributed:
        return
    ledger = node._open_ledger(node.delta(job))
    for run_id, entry in _ledger_entries(node, job).items():
        round_no = _round_of(run_id, job.job_id)
        if entry["status"] == "reserved" and round_no and round_no < before_round:
            ledger.release(run_id, node.bundle.train.dataset_id)


def _check_release_mode(node: SiteNode, job: FederationConfig) -> None:
    if not job.private and node.budget_epsilon is not None:
        raise ConfigError("This node keeps a privacy budget and does not release "
                          "non-private statistics (the job has --dp none).")


def node_statistics(node: SiteNode, job: FederationConfig, threshold: int | None) -> NodeReply:
    """Noisy per-channel sums ``[sum mean_c, sum mean_c(x^2), count]`` of this node's
    training images; ``threshold`` is the secure-aggregation threshold (None: plain)."""
    try:
        store = node.stored_path(job, "stats.pt")
        replay = load_stored_reply(store, job, secure=threshold is not None)
        if replay is not None:
            return replay
        _check_release_mode(node, job)
        train = node.bundle.train
        images = train.images.clamp(0, 1)
        per_image = torch.cat([images.mean(dim=(2, 3)), (images ** 2).mean(dim=(2, 3)),
                               torch.ones(images.shape[0], 1)], dim=1).double()
        if node.privacy_unit == "patient":  # one row per patient: the mean of their images
            index, n_patients = train.patient_index
            index = torch.from_numpy(index)
            counts = torch.bincount(index, minlength=n_patients).double().unsqueeze(1)
            per_image = per_image.new_zeros((n_patients, per_image.shape[1])).index_add_(
                0, index, per_image) / counts
        vector = per_image.sum(dim=0)
        privacy: dict[str, Any] = {"enabled": False}
        if job.private:
            history = job.stats_history()
            _reserve(node, job, stats_run_id(job.job_id), history)
            # Every image's (or patient's) row has L2 norm <= sqrt(2C + 1): pixels lie in [0, 1].
            sensitivity = math.sqrt(vector.numel())
            std = job.norm_noise_multiplier * sensitivity / math.sqrt(threshold or 1)
            vector = vector + SecureRandom().gaussian(vector.shape, std, dtype=torch.float64)
            privacy = {"enabled": True, "noise_multiplier": job.norm_noise_multiplier,
                       "history": history_to_json(history), "secagg_threshold": threshold}
            if threshold is None:  # plain aggregation: this reply is the release
                charge_release(node, job.job_id, STATS_ROUND)
        reply = NodeReply("ok", node.name, "", node.num_examples, {}, privacy,
                          arrays={"stats": (vector.numpy() / VECTOR_SCALE)})
        store_reply(store, reply, job, secure=threshold is not None)
        return reply
    except BudgetExceededError as exc:
        return NodeReply("refused", node.name, str(exc), node.num_examples)
    except PrivmedError as exc:
        return NodeReply("error", node.name, str(exc), node.num_examples)


def statistics_from_sum(total: np.ndarray, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) from the summed statistics vectors, kept in sane ranges."""
    total = np.asarray(total, dtype=np.float64) * VECTOR_SCALE
    count = max(float(total[-1]), 1.0)
    mean = np.clip(total[:channels] / count, 0.0, 1.0)
    square = np.clip(total[channels:2 * channels] / count, 0.0, 1.0)
    std = np.clip(np.sqrt(np.maximum(square - mean ** 2, 0.0)), 0.02, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]


def distributed_plan(node: SiteNode, job: FederationConfig) -> tuple[float, float, float]:
    """(noise multiplier, sample rate, delta): ``job.rounds`` steps of rate ``B/n`` after
    the normalisation statistics reach the job's epsilon on this node's data."""
    n = node.num_examples
    q = min(job.batch_size, n) / n  # per patient when the node knows them: expected B images
    delta = node.delta(job)
    key = ("distributed", job.epsilon, delta, q, job.rounds, job.accountant,
           tuple(job.stats_history()))
    if key not in node._sigmas:
        node._sigmas[key] = calibrate_noise_multiplier(job.epsilon, delta, q, job.rounds,
                                                       job.accountant, job.stats_history())
    return node._sigmas[key], q, delta


def noisy_gradient(node: SiteNode, job: FederationConfig, round_no: int, arrays: Arrays,
                   threshold: int, trainable: list[str]) -> NodeReply:
    """One FedSGD step's share: the clipped per-sample gradient sum of a Poisson batch plus
    ``N(0, (sigma C)^2 / t)``, and the expected batch size, as one vector."""
    try:
        store = node.stored_path(job, f"round-{round_no:04d}.pt")
        replay = load_stored_reply(store, job, secure=True)
        if replay is not None:
            return replay
        if not job.distributed:
            raise ConfigError("This round asks for a distributed-DP step, but the job does "
                              "not use --dp distributed.")
        release_discarded(node, job, round_no)
        sigma, q, delta = distributed_plan(node, job)
        _reserve(node, job, round_run_id(job.job_id, round_no), [(sigma, q, 1)])
        gradient, loss = _clipped_gradient_sum(node, job, arrays, trainable, q)
        std = sigma * job.max_grad_norm / math.sqrt(threshold)
        noisy = gradient + SecureRandom().gaussian(gradient.shape, std, dtype=torch.float64)
        expected_batch = q * node.num_units  # patients (or images) per step, expected
        vector = torch.cat([noisy, torch.tensor([expected_batch], dtype=torch.float64)])
        done = released_rounds(node, job) + 1
        history = [*job.stats_history(), (sigma, q, done)]
        privacy = {"enabled": True, "mode": "distributed", "unit": node.privacy_unit,
                   "units": node.num_units, "noise_multiplier": sigma,
                   "noise_share": 1 / math.sqrt(threshold), "secagg_threshold": threshold,
                   "sample_rate": q, "delta": delta,
                   "steps": 1, "max_grad_norm": job.max_grad_norm,
                   "accountant": job.accountant, "rounds_trained": done,
                   "history": history_to_json(history),
                   "epsilon": compute_epsilon(history, delta, job.accountant)}
        ledger = node._open_ledger(delta)
        if ledger.budget(node.bundle.train.dataset_id) is not None:
            privacy["ledger_remaining_epsilon"] = ledger.remaining(node.bundle.train.dataset_id)
        reply = NodeReply("ok", node.name, "", node.num_examples, {"loss": loss}, privacy,
                          arrays={"grad": vector.numpy() / VECTOR_SCALE})
        store_reply(store, reply, job, secure=True)
        return reply
    except BudgetExceededError as exc:
        return NodeReply("refused", node.name, str(exc), node.num_examples)
    except PrivmedError as exc:
        return NodeReply("error", node.name, str(exc), node.num_examples)


def _clipped_gradient_sum(node: SiteNode, job: FederationConfig, arrays: Arrays,
                          trainable: list[str], q: float) -> tuple[torch.Tensor, float | None]:
    train = node.bundle.train
    model = create_model(job.model, train.image_shape[0], train.num_classes,
                         **job.model_kwargs(train.image_shape))
    load_arrays(model, arrays)
    params = dict(model.named_parameters())
    if sorted(trainable) != trainable_keys(model):
        raise ConfigError("The coordinator's list of trained parameters does not match this "
                          "node's model.")
    groups = None
    if node.privacy_unit == "patient":  # Poisson-sample patients; each brings all images
        index, n_patients = train.patient_index
        index = torch.from_numpy(index)
        chosen = SecureRandom().bernoulli(n_patients, q)[index]
        order = torch.argsort(index[chosen], stable=True)  # a patient's images together
        groups = index[chosen][order]
    else:
        chosen = SecureRandom().bernoulli(len(train), q)  # Poisson sampling
        order = None
    total = torch.zeros(sum(params[k].numel() for k in trainable), dtype=torch.float64)
    if not chosen.any():
        return total, None
    fixed = getattr(model, "fixed_features", None)
    net: nn.Module = model
    prefix = ""
    if fixed is not None:  # a fixed front end is data-independent: only the head trains
        features = fixed_feature_dataset(fixed, train)  # computed once per job, not per round
        images, labels = features.images[chosen], features.labels[chosen]
        net, prefix = model.head, "head."
    else:
        images, labels = train.images[chosen], train.labels[chosen]
    if order is not None:
        images, labels = images[order], labels[order]
    net.eval()
    weights = {k[len(prefix):]: params[k].detach() for k in trainable}
    losses = []
    for chunk in _chunks(groups, images.shape[0], 512):
        x, y = images[chunk], labels[chunk]
        total += clipped_gradient_sum(net, weights, x, y, job.max_grad_norm,
                                      None if groups is None else groups[chunk])
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(net(x), y)) * x.shape[0])
    return total, sum(losses) / images.shape[0]


def _chunks(groups: torch.Tensor | None, n: int, size: int) -> list[slice]:
    """Slices of at most ``size`` rows (more only for one patient larger than that), never
    cutting a group: each patient's gradient is summed whole before it is clipped."""
    if groups is None:
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]
    starts = [0, *(torch.nonzero(groups[1:] != groups[:-1]).view(-1) + 1).tolist()]
    out, begin = [], 0
    for start, stop in zip(starts, [*starts[1:], n], strict=True):
        if stop - begin > size and start > begin:
            out.append(slice(begin, start))
            begin = start
    out.append(slice(begin, n))
    return out


def clipped_gradient_sum(net: nn.Module, weights: dict[str, torch.Tensor],
                         images: torch.Tensor, labels: torch.Tensor,
                         max_grad_norm: float, groups: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Sum of the per-example cross-entropy gradients with respect to ``weights`` (names
    relative to ``net``), each clipped to L2 norm ``max_grad_norm``: flattened, float64,
    in the order of ``weights``. The node's DP step, and what the inversion audit attacks.
    ``groups`` (one id per image): each group's (patient's) gradients are summed first and
    the sum is clipped."""

    def sample_loss(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                    ) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(net, w, (x.unsqueeze(0),)),
                                           y.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(weights, images, labels)
    flat = torch.cat([grads[k].reshape(images.shape[0], -1) for k in weights], dim=1).double()
    if groups is not None:
        _, inverse = torch.unique(groups, return_inverse=True)
        flat = flat.new_zeros((int(inverse.max()) + 1, flat.shape[1])).index_add_(0, inverse,
                                                                                  flat)
    norms = flat.norm(dim=1, keepdim=True)
    return (flat * (max_grad_norm / norms.clamp(min=max_grad_norm))).sum(dim=0)


# ----------------------------------------------------------------------------- coordinator

class ServerOptimizer:
    """Applies the aggregated noisy gradient (post-processing: no privacy cost) as central
    training does: Adam, cosine-decayed over the job's rounds, and an exponential moving
    average of the iterates (decay ``ema_decay``, TrainConfig's default) as the model that
    is evaluated and saved; the nodes keep computing gradients at the iterate."""

    def __init__(self, arrays: Arrays, trainable: list[str], job: FederationConfig,
                 ema_decay: float = 0.9) -> None:
        self.trainable = list(trainable)
        self.ema_decay = ema_decay
        self.ema: list[np.ndarray] | None = None
        self.params = [nn.Parameter(torch.from_numpy(np.array(arrays[k], dtype=np.float32)))
                       for k in self.trainable]
        self.optimizer = torch.optim.Adam(self.params, lr=job.lr)
        rounds = max(job.rounds, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, rounds) / rounds)))

    def step(self, arrays: Arrays, total: np.ndarray) -> Arrays:
        """New global arrays from ``total`` = sum of the nodes' vectors (decoded)."""
        total = np.asarray(total, dtype=np.float64) * VECTOR_SCALE
        batch = float(total[-1])
        if batch <= 0.5:
            raise ValueError("no examples were sampled")
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
        if self.ema is None:  # as torch's AveragedModel: the first update copies
            self.ema = current
        else:
            d = self.ema_decay
            self.ema = [d * e + (1 - d) * c for e, c in zip(self.ema, current, strict=True)]
        return new

    def averaged(self, arrays: Arrays) -> Arrays:
        """``arrays`` with the trained values replaced by their moving average."""
        if self.ema is None:
            return arrays
        out = dict(arrays)
        for key, value in zip(self.trainable, self.ema, strict=True):
            out[key] = value.astype(arrays[key].dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        # tensors, not numpy: checkpoints are read with torch.load(weights_only=True)
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": None if self.ema is None else [torch.from_numpy(e) for e in self.ema]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ema = state.get("ema")
        self.ema = None if ema is None else [e.numpy().astype(np.float64) for e in ema]
