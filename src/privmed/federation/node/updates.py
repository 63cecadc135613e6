"""What a node computes for a request: a local round, a noisy gradient share, statistics.

* **local round** (``--dp local`` and ``--dp none``): ``fit()`` for the job's local epochs
  on the global model, under the node's own plan and ledger.
* **noisy gradient share** (``--dp distributed``; Dopamine, Malekzadeh et al. 2021): under
  secure aggregation with threshold ``t`` the coordinator only ever sees the sum of at
  least ``t`` nodes' vectors. The node Poisson-samples a batch (rate ``q = B / n``), clips
  every per-sample (per-patient) gradient to ``C`` and adds Gaussian noise of standard
  deviation ``sigma * C / sqrt(t)``: the sum then carries at least ``sigma * C``, the
  noise of one central DP-SGD step on the union of the sites' data, accounted per node as
  ``(sigma, q, 1)``. It sends the noisy sum with its expected batch size.
* **normalisation statistics** (as PriMIA): per-channel sums of each image's (patient's)
  pixel mean and mean square, and the count; one Gaussian release ``(sigma_n, 1, 1)``.

Each is computed once: a repeated request is answered from the replay store, never with
fresh noise. The guarantee of a share assumes, as Dopamine does, that at least ``t`` nodes
add theirs honestly (docs/threat-model.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from privmed.errors import BudgetExceededError, ConfigError, PrivmedError
from privmed.federation.config import FederationConfig
from privmed.federation.messages import (
    STATS_ROUND,
    VECTOR_SCALE,
    Arrays,
    NodeReply,
    load_arrays,
    state_to_arrays,
    trainable_keys,
)
from privmed.federation.node.site import SiteNode
from privmed.models import create_model
from privmed.privacy import SecureRandom, compute_epsilon, history_to_json
from privmed.privacy.clipping import clipped_sum_in_chunks
from privmed.training import fit
from privmed.training.features import fixed_feature_dataset


def _answered(node: SiteNode, compute: Callable[[], NodeReply]) -> NodeReply:
    """``compute()``, with a refusal or error turned into a reply saying why: a node never
    raises for a bad request or an exhausted budget."""
    try:
        return compute()
    except BudgetExceededError as exc:
        return node.refusal(str(exc))
    except PrivmedError as exc:
        return node.failure(str(exc))


def _model(node: SiteNode, job: FederationConfig, arrays: Arrays) -> nn.Module:
    train = node.bundle.train
    model = create_model(job.model, train.image_shape[0], train.num_classes,
                         **job.model_kwargs(train.image_shape))
    load_arrays(model, arrays)
    return model


def _privacy_figures(node: SiteNode, job: FederationConfig, mode: str, sigma: float,
                     sample_rate: float, steps: int, rounds_trained: int, delta: float
                     ) -> dict[str, Any]:
    """The node's privacy after this round, as it reports it (before ``public_privacy``)."""
    history = [*job.stats_history(), (sigma, sample_rate, steps * rounds_trained)]
    return {"enabled": True, "mode": mode, "unit": node.privacy_unit,
            "units": node.num_units, "noise_multiplier": sigma, "sample_rate": sample_rate,
            "delta": delta, "steps": steps, "max_grad_norm": job.max_grad_norm,
            "accountant": job.accountant, "rounds_trained": rounds_trained,
            "history": history_to_json(history),
            "epsilon": compute_epsilon(history, delta, job.accountant)}


def _with_remaining(node: SiteNode, privacy: dict[str, Any], delta: float) -> dict[str, Any]:
    ledger = node.open_ledger(delta)
    if ledger.budget(node.dataset_id) is not None:
        privacy["ledger_remaining_epsilon"] = ledger.remaining(node.dataset_id)
    return privacy


# ----------------------------------------------------------------------------- local round

def train_round(node: SiteNode, job: FederationConfig, round_no: int, arrays: Arrays, *,
                secure: bool = False) -> NodeReply:
    """Train the global model ``arrays`` locally for the job's epochs; never raises for
    a refusal or bad request (the reply says why). ``secure``: the reply goes out
    masked (secure aggregation)."""
    return _answered(node, lambda: _train_round(node, job, round_no, arrays, secure))


def _train_round(node: SiteNode, job: FederationConfig, round_no: int, arrays: Arrays,
                 secure: bool) -> NodeReply:
    replay = node.replay(job, round_no, secure=secure)
    if replay is not None:
        return replay
    node.check_release_mode(job)
    model = _model(node, job, arrays)
    privacy = ledger = None
    figures: dict[str, Any] = {"enabled": False}
    if job.private:
        plan = node.plan(job)
        privacy = node.privacy_config(job, plan.noise_multiplier)
        ledger = node.open_ledger(plan.delta)
        figures = _privacy_figures(node, job, "local", plan.noise_multiplier,
                                   plan.sample_rate, node.steps_per_round(job),
                                   node.rounds_stored(job) + 1, plan.delta)
    start = time.perf_counter()
    result = fit(model, node.bundle.train, node.bundle.val, node.train_config(job, round_no),
                 privacy, ledger=ledger, run_id=f"{job.job_id}-round-{round_no}")
    metrics = {"loss": result.epochs[-1].get("loss"), "seconds": time.perf_counter() - start}
    if "val" in result.metrics:
        metrics["val_auc"] = result.metrics["val"].get("roc_auc")
        metrics["val_accuracy"] = result.metrics["val"]["accuracy"]
    if ledger is not None:
        _with_remaining(node, figures, plan.delta)
    reply = NodeReply("ok", node.name, "", node.num_examples, metrics, figures,
                      arrays=state_to_arrays(result.model))
    node.keep(reply, job, round_no, secure=secure)
    return reply


# ----------------------------------------------------------------------------- distributed DP

def noisy_gradient(node: SiteNode, job: FederationConfig, round_no: int, arrays: Arrays,
                   threshold: int, trainable: list[str]) -> NodeReply:
    """One FedSGD step's share: the clipped per-sample gradient sum of a Poisson batch plus
    ``N(0, (sigma C)^2 / t)``, and the expected batch size, as one vector."""
    return _answered(node, lambda: _noisy_gradient(node, job, round_no, arrays, threshold,
                                                   trainable))


def _noisy_gradient(node: SiteNode, job: FederationConfig, round_no: int, arrays: Arrays,
                    threshold: int, trainable: list[str]) -> NodeReply:
    replay = node.replay(job, round_no, secure=True)
    if replay is not None:
        return replay
    if not job.distributed:
        raise ConfigError("This round asks for a distributed-DP step, but the job does "
                          "not use --dp distributed.")
    node.check_release_mode(job)
    node.release_discarded(job, round_no)
    plan = node.plan(job)
    sigma, q = plan.noise_multiplier, plan.sample_rate
    node.reserve(job, round_no, [(sigma, q, 1)])
    gradient, loss = clipped_gradient_share(node, job, arrays, trainable, q)
    std = sigma * job.max_grad_norm / math.sqrt(threshold)
    noisy = gradient + SecureRandom().gaussian(gradient.shape, std, dtype=torch.float64)
    expected_batch = q * node.num_units  # patients (or images) per step, expected
    vector = torch.cat([noisy, torch.tensor([expected_batch], dtype=torch.float64)])
    figures = _privacy_figures(node, job, "distributed", sigma, q, 1,
                               node.released_rounds(job) + 1, plan.delta)
    figures.update(noise_share=1 / math.sqrt(threshold), secagg_threshold=threshold)
    reply = NodeReply("ok", node.name, "", node.num_examples, {"loss": loss},
                      _with_remaining(node, figures, plan.delta),
                      arrays={"grad": vector.numpy() / VECTOR_SCALE})
    node.keep(reply, job, round_no, secure=True)
    return reply


def clipped_gradient_share(node: SiteNode, job: FederationConfig, arrays: Arrays,
                           trainable: list[str], q: float) -> tuple[torch.Tensor, float | None]:
    """The clipped gradient sum of one Poisson batch of the node's patients (or images)
    at the global model ``arrays``, and its mean loss (None for an empty batch)."""
    train = node.bundle.train
    model = _model(node, job, arrays)
    params = dict(model.named_parameters())
    if sorted(trainable) != trainable_keys(model):
        raise ConfigError("The coordinator's list of trained parameters does not match this "
                          "node's model.")
    groups = order = None
    if node.privacy_unit == "patient":  # Poisson-sample patients; each brings all images
        index, n_patients = train.patient_index
        index = torch.from_numpy(index)
        chosen = SecureRandom().bernoulli(n_patients, q)[index]
        order = torch.argsort(index[chosen], stable=True)  # a patient's images together
        groups = index[chosen][order]
    else:
        chosen = SecureRandom().bernoulli(len(train), q)  # Poisson sampling
    if not chosen.any():
        return torch.zeros(sum(params[k].numel() for k in trainable), dtype=torch.float64), None
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
    return clipped_sum_in_chunks(net, weights, images, labels, job.max_grad_norm, groups)


# ----------------------------------------------------------------------------- statistics

def node_statistics(node: SiteNode, job: FederationConfig, threshold: int | None) -> NodeReply:
    """Noisy per-channel sums ``[sum mean_c, sum mean_c(x^2), count]`` of this node's
    training images; ``threshold`` is the secure-aggregation threshold (None: plain)."""
    return _answered(node, lambda: _node_statistics(node, job, threshold))


def _node_statistics(node: SiteNode, job: FederationConfig, threshold: int | None
                     ) -> NodeReply:
    secure = threshold is not None
    replay = node.replay(job, STATS_ROUND, secure=secure)
    if replay is not None:
        return replay
    node.check_release_mode(job)
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
        node.reserve(job, STATS_ROUND, history)
        # Every image's (or patient's) row has L2 norm <= sqrt(2C + 1): pixels lie in [0, 1].
        sensitivity = math.sqrt(vector.numel())
        std = job.norm_noise_multiplier * sensitivity / math.sqrt(threshold or 1)
        vector = vector + SecureRandom().gaussian(vector.shape, std, dtype=torch.float64)
        privacy = {"enabled": True, "noise_multiplier": job.norm_noise_multiplier,
                   "history": history_to_json(history), "secagg_threshold": threshold}
        if not secure:  # plain aggregation: this reply is the release
            node.charge_release(job.job_id, STATS_ROUND)
    reply = NodeReply("ok", node.name, "", node.num_examples, {}, privacy,
                      arrays={"stats": (vector.numpy() / VECTOR_SCALE)})
    node.keep(reply, job, STATS_ROUND, secure=secure)
    return reply
