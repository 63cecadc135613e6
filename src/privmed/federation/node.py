"""A hospital's node: ``fit()`` for one round on local data, behind the node's own ledger.

Transport-free: the Flower ClientApp (``flower_apps``) only decodes a round request,
calls :meth:`SiteNode.train_round` and encodes the reply. The node, never the
coordinator, decides clipping and noise: it calibrates its noise multiplier so that
the job's rounds reach the job's epsilon on *its* data, and charges every round to its
ledger before training (refusing a round that would overspend).

A round's reply is stored beside the ledger once trained. When the coordinator asks for
the same round again (it crashed and resumed), the stored reply is sent again: re-sending
an output already released costs no privacy, so the ledger is not charged twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from privmed.data import DataBundle, load_data
from privmed.errors import BudgetExceededError, ConfigError, PrivmedError
from privmed.federation.config import FederationConfig
from privmed.fileio import save_private_torch
from privmed.models import create_model
from privmed.privacy import (
    BudgetLedger,
    PrivacyConfig,
    calibrate_noise_multiplier,
    compute_epsilon,
    default_delta,
    history_to_json,
)
from privmed.privacy.ledger_home import LEDGER_NAME
from privmed.privacy.records import protected_units
from privmed.training import TrainConfig, fit
from privmed.training.run import open_ledger

if TYPE_CHECKING:
    from privmed.privacy.records import PrivacyRecords

Arrays = dict[str, np.ndarray]


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


def state_to_arrays(model: torch.nn.Module) -> Arrays:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


class StoredReplyError(ConfigError):
    """A stored reply may not be sent for this request."""


# Settings a resumed job may change without changing what a round computes.
_OPERATIONAL = ("round_timeout", "min_nodes", "round_retries")


def job_fingerprint(job: FederationConfig) -> str:
    """What a stored reply answered: the job's settings, bar the operational ones."""
    record = {k: v for k, v in job.to_record().items() if k not in _OPERATIONAL}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _read_stored(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


def _write_stored(path: Path, saved: dict[str, Any]) -> None:
    save_private_torch(saved, path)  # 0600: a released model or a noise share


def load_stored_reply(path: Path | None, job: FederationConfig, *, secure: bool
                      ) -> NodeReply | None:
    """A reply this node already released for ``job``, marked as replayed; None if there
    is none. Refused (StoredReplyError) for another job under the same id, and in the
    clear when it was made for secure aggregation (a distributed-DP share carries only
    part of the noise; any masked vector was meant to be seen only in a sum)."""
    if path is None or not path.exists():
        return None
    saved = _read_stored(path)
    binding = saved.get("binding") or {"secure": True}
    if binding.get("job") not in (None, job_fingerprint(job)):
        raise StoredReplyError(f"This node answered {path.stem} of job {job.job_id} for other "
                               "settings; run the new settings under a new job id.")
    if binding.get("secure") and not secure:
        raise StoredReplyError(f"This node answered {path.stem} of job {job.job_id} under "
                               "secure aggregation and will not send it in the clear; run "
                               "the job under a new id.")
    reply = NodeReply.from_meta(json.loads(saved["meta"]), saved["arrays"])
    reply.replayed = True
    return reply


def store_reply(path: Path | None, reply: NodeReply, job: FederationConfig, *,
                secure: bool) -> None:
    """Keep a released reply (atomically) so that a repeated request re-sends it, bound to
    the job's settings and to whether it was made for secure aggregation."""
    if path is None:
        return
    _write_stored(path, {"meta": json.dumps(reply.meta()), "arrays": reply.arrays,
                         "binding": {"job": job_fingerprint(job), "secure": secure,
                                     "revealed_with": None}})


def bind_survivors(path: Path, survivors: list[int]) -> None:
    """Record the one set of survivors a stored vector may be unmasked with, or refuse
    another: two sums over different survivor sets that share replayed vectors give
    the coordinator their difference, one node's vector."""
    saved = _read_stored(path)
    binding = saved.setdefault("binding", {"secure": True})
    bound = binding.get("revealed_with")
    if bound is None:
        binding["revealed_with"] = sorted(int(n) for n in survivors)
        _write_stored(path, saved)
    elif bound != sorted(int(n) for n in survivors):
        raise StoredReplyError(f"This node already revealed its {path.stem} vector in a sum "
                               "with other survivors; revealing it with another set would "
                               "give away one node's vector as the difference.")


def load_arrays(model: torch.nn.Module, arrays: Arrays) -> None:
    """Load wire arrays into ``model``; a mismatch is a clear ConfigError."""
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


class SiteNode:
    """One site's data, ledger and budget. ``train_round`` is what a round runs.

    ``max_sites``: how many sites this hospital knows the federation has; under secure
    aggregation it refuses a roster of more nodes (a coordinator padding the roster with
    nodes of its own would need fewer real survivors to unmask)."""

    def __init__(self, data: str | Path | DataBundle, *, ledger: str | Path | None = None,
                 budget_epsilon: float | None = None, name: str | None = None,
                 size: int | None = None, max_sites: int | None = None) -> None:
        if max_sites is not None and (isinstance(max_sites, bool) or max_sites < 2):
            raise ConfigError(f"A federation has at least 2 sites, not {max_sites!r}.")
        self.max_sites = max_sites
        self.bundle = data if isinstance(data, DataBundle) else load_data(data, size=size)
        self.name = name or self.bundle.source
        if budget_epsilon is not None and ledger is None:
            raise ConfigError("A node's budget needs --ledger FILE to record it in.")
        self.ledger_path = Path(ledger) if ledger is not None else None
        self.budget_epsilon = budget_epsilon
        self._sigmas: dict[tuple, float] = {}
        if self.ledger_path is not None:
            self._open_ledger()  # fail at start-up, not in the first round

    @property
    def num_examples(self) -> int:
        return len(self.bundle.train)

    @property
    def privacy_unit(self) -> str:
        """What this node's DP protects: 'patient' whenever its data names the patients."""
        return protected_units("auto", self.bundle.train)[0]

    @property
    def num_units(self) -> int:
        """Patients (or images, when the patients are unknown) in the training split."""
        return protected_units("auto", self.bundle.train)[1]

    def privacy_records(self) -> PrivacyRecords:
        """The records this node's DP releases touch, for its ledger."""
        return self.bundle.train.privacy_records(self.privacy_unit)

    def _open_ledger(self, delta: float | None = None) -> BudgetLedger:
        assert self.ledger_path is not None
        n = self.num_units
        return open_ledger(self.ledger_path, self.bundle.train.dataset_id, self.budget_epsilon,
                           delta if delta is not None else default_delta(n))

    # ---------------------------------------------------------------- privacy plan

    def delta(self, job: FederationConfig) -> float:
        """The job's delta, or the default for this node's size; must be below 1/N (N its
        patients, or images when the patients are unknown)."""
        n = self.num_units
        delta = job.delta if job.delta is not None else default_delta(n)
        if delta >= 1.0 / n:
            raise ConfigError(f"Delta {delta:g} is not below 1/N for this node's {n} "
                              f"{self.privacy_unit}s.")
        return delta

    def privacy_plan(self, job: FederationConfig) -> tuple[PrivacyConfig, float, int]:
        """(per-round PrivacyConfig, sample rate, steps per round) for this node's data."""
        n = self.num_examples
        steps_per_epoch = math.ceil(n / min(job.batch_size, n))
        sample_rate = 1.0 / steps_per_epoch
        steps_per_round = steps_per_epoch * job.local_epochs
        delta = self.delta(job)
        prefix = tuple(job.stats_history())  # the normalisation statistics come first
        key = (job.epsilon, delta, sample_rate, steps_per_round * job.rounds, job.accountant,
               prefix)
        if key not in self._sigmas:  # calibration takes seconds: once per job, not per round
            self._sigmas[key] = calibrate_noise_multiplier(*key[:5], prefix=prefix)
        sigma = self._sigmas[key]
        return (PrivacyConfig(noise_multiplier=sigma, delta=delta,
                              max_grad_norm=job.max_grad_norm, accountant=job.accountant,
                              unit=self.privacy_unit),
                sample_rate, steps_per_round)

    # ---------------------------------------------------------------- rounds

    def stored_path(self, job: FederationConfig, name: str) -> Path | None:
        """Where this node keeps a released reply of ``job`` (beside its ledger)."""
        if self.ledger_path is None:
            return None
        rounds = self.ledger_path.parent / f"{self.ledger_path.name}.rounds"
        if self.ledger_path.name == LEDGER_NAME and not (rounds / job.job_id).is_dir():
            rounds = rounds / self.bundle.train.dataset_id  # a ledger folder's sites share it
        return rounds / job.job_id / name

    def _round_file(self, job: FederationConfig, round_no: int) -> Path | None:
        return self.stored_path(job, f"round-{round_no:04d}.pt")

    def _rounds_done(self, job: FederationConfig) -> int:
        probe = self._round_file(job, 0)
        return len(list(probe.parent.glob("round-*.pt"))) if probe and probe.parent.exists() else 0

    def train_round(self, job: FederationConfig, round_no: int, arrays: Arrays, *,
                    secure: bool = False) -> NodeReply:
        """Train the global model ``arrays`` locally for the job's epochs; never raises for
        a refusal or bad request (the reply says why). ``secure``: the reply goes out
        masked (secure aggregation)."""
        try:
            return self._train_round(job, round_no, arrays, secure)
        except BudgetExceededError as exc:
            return NodeReply("refused", self.name, str(exc), self.num_examples)
        except PrivmedError as exc:
            return NodeReply("error", self.name, str(exc), self.num_examples)

    def _train_round(self, job: FederationConfig, round_no: int, arrays: Arrays,
                     secure: bool) -> NodeReply:
        cached = self._round_file(job, round_no)
        replay = load_stored_reply(cached, job, secure=secure)
        if replay is not None:
            return replay
        if job.private and self.ledger_path is None:
            raise ConfigError("This node has no ledger; it only takes DP jobs with a ledger "
                              "(start it with --ledger FILE --budget-epsilon E).")
        if not job.private and self.budget_epsilon is not None:
            raise ConfigError("This node keeps a privacy budget and does not release "
                              "non-private updates (the job has --dp none).")
        train = self.bundle.train
        model = create_model(job.model, train.image_shape[0], train.num_classes,
                             **job.model_kwargs(train.image_shape))
        load_arrays(model, arrays)
        config = TrainConfig(epochs=job.local_epochs, batch_size=job.batch_size,
                             physical_batch_size=min(job.batch_size, 1024), lr=job.lr,
                             lr_schedule="constant", ema_decay=None,
                             seed=job.seed * 100_003 + round_no)
        privacy = ledger = None
        plan: dict[str, Any] = {"enabled": False}
        if job.private:
            privacy, sample_rate, steps = self.privacy_plan(job)
            ledger = self._open_ledger(privacy.delta)
            sigma = float(privacy.noise_multiplier)
            done = self._rounds_done(job) + 1
            history = [*job.stats_history(), (sigma, sample_rate, steps * done)]
            plan = {"enabled": True, "mode": "local", "unit": self.privacy_unit,
                    "units": self.num_units, "noise_multiplier": sigma,
                    "sample_rate": sample_rate, "delta": privacy.delta, "steps": steps,
                    "max_grad_norm": job.max_grad_norm, "accountant": job.accountant,
                    "rounds_trained": done, "history": history_to_json(history),
                    "epsilon": compute_epsilon(history, privacy.delta, job.accountant)}
        start = time.perf_counter()
        result = fit(model, train, self.bundle.val, config, privacy, ledger=ledger,
                     run_id=f"{job.job_id}-round-{round_no}")
        metrics = {"loss": result.epochs[-1].get("loss"), "seconds": time.perf_counter() - start}
        if "val" in result.metrics:
            metrics["val_auc"] = result.metrics["val"].get("roc_auc")
            metrics["val_accuracy"] = result.metrics["val"]["accuracy"]
        if ledger is not None and ledger.budget(train.dataset_id) is not None:
            plan["ledger_remaining_epsilon"] = ledger.remaining(train.dataset_id)
        reply = NodeReply("ok", self.name, "", self.num_examples, metrics, plan,
                          arrays=state_to_arrays(result.model))
        store_reply(cached, reply, job, secure=secure)
        return reply
