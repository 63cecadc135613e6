"""What a federated job asks of every node: the model, the rounds and the privacy plan.

The coordinator sends this (flattened) with every round; each node checks it and
decides its own clipping and noise from it: the data owner enforces privacy.

A job is composed of what central training asks for: :meth:`FederationConfig.train_config`
(a node's :class:`~privmed.training.TrainConfig` for one round) and
:meth:`FederationConfig.privacy_config` (its :class:`~privmed.privacy.PrivacyConfig`)
are built, and so validated, by the job itself; its own checks cover only what is the
federation's (rounds, nodes, DP mode, secure aggregation, timeouts). The wire and record
form stays flat (``to_record`` / ``from_record``): nodes and checkpoints read its fields.

DP modes: ``distributed`` (the default under secure aggregation; Dopamine's FedSGD,
each node adds its share of the noise of one central DP-SGD step per round), ``local``
(each node runs DP-SGD for ``local_epochs`` and adds all the noise itself; the default
without secure aggregation) and ``none``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from privmed.checks import is_positive, is_whole
from privmed.errors import ConfigError

if TYPE_CHECKING:
    from privmed.privacy.config import PrivacyConfig
    from privmed.training.config import TrainConfig

DPMode = Literal["distributed", "local", "none"]
# Keys a round request carries beside the job: the secure round's active nodes, mask
# instance and whether it adds self masks, the phase ("stats" before training) and the
# names of the trained parameters.
_REQUEST_KEYS = ("secure_active", "secure_instance", "secure_self_mask", "phase",
                 "trainable")
_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


@dataclass
class FederationConfig:
    """A federated job. ``epsilon`` is each node's target for the whole job (all rounds);
    ``min_nodes`` must be connected before the first round, later rounds go on with
    whichever nodes are connected. ``dp=None`` picks ``distributed`` under secure
    aggregation and ``local`` without it. ``normalize``: measure the sites' pixel mean and
    std (with DP noise of multiplier ``norm_noise_multiplier``) before training;
    ``input_mean`` / ``input_std`` then carry them to every node. A round that cannot
    be aggregated is tried ``round_retries`` more times before it is recorded as failed.
    ``secagg_threshold``: the fraction of the nodes at key setup that must survive a
    secure round (at least 2); under distributed DP each node adds ``1/sqrt(t)`` of the
    noise, so a higher threshold means less total noise and less tolerance of dropouts.
    ``secagg_optimistic``: secure training rounds are masked without self masks, which
    saves the unmasking exchange when every node's vector arrives; a round with a
    missing vector is then lost (not retried), and from then on rounds add self masks and
    survive dropouts."""

    job_id: str
    model: str
    rounds: int = 5
    local_epochs: int = 2
    batch_size: int = 256
    lr: float = 1e-2
    dp: DPMode | None = None
    epsilon: float = 3.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    seed: int = 0
    min_nodes: int = 1
    round_timeout: float = 600.0
    secure_agg: bool = True
    normalize: bool = False
    norm_noise_multiplier: float = 20.0
    round_retries: int = 2
    secagg_threshold: float = 2 / 3
    secagg_optimistic: bool = True
    input_mean: list[float] | None = None
    input_std: list[float] | None = None

    def __post_init__(self) -> None:
        if self.dp is None:
            self.dp = "distributed" if self.secure_agg else "local"
        if not (isinstance(self.job_id, str) and _JOB_ID.match(self.job_id)):
            raise ConfigError(f"Job id '{self.job_id}' may only hold letters, digits, '.', '_' "
                              "and '-' (at most 80).")
        for name in ("rounds", "min_nodes"):
            value = getattr(self, name)
            if not is_whole(value, 1):
                raise ConfigError(f"{name.replace('_', ' ').capitalize()} must be a positive "
                                  f"whole number, got {value!r}.")
        if not is_whole(self.seed):
            raise ConfigError(f"The seed must be a whole number, got {self.seed!r}.")
        if self.dp not in ("distributed", "local", "none"):
            raise ConfigError(f"Unknown DP mode '{self.dp}': use 'distributed', 'local' or "
                              "'none'.")
        if self.dp == "distributed" and not self.secure_agg:
            raise ConfigError("Distributed DP needs secure aggregation: each node adds only a "
                              "share of the noise, so its update must never be seen alone "
                              "(drop --no-secure-agg, or use --dp local).")
        if not is_whole(self.round_retries, 0):
            raise ConfigError(f"Round retries must be a whole number >= 0, got "
                              f"{self.round_retries!r}.")
        if not (isinstance(self.secagg_threshold, int | float)
                and 0.5 <= self.secagg_threshold <= 1):
            raise ConfigError(f"The secure-aggregation threshold must be a fraction between 0.5 "
                              f"and 1 of the nodes, got {self.secagg_threshold!r}.")
        if not isinstance(self.secagg_optimistic, bool):
            raise ConfigError(f"secagg_optimistic must be true or false, got "
                              f"{self.secagg_optimistic!r}.")
        if (self.input_mean is None) != (self.input_std is None):
            raise ConfigError("Input statistics need both a mean and a std.")
        for name in ("round_timeout", "norm_noise_multiplier"):
            value = getattr(self, name)
            if not is_positive(value):
                raise ConfigError(f"{name.replace('_', ' ').capitalize()} must be a positive "
                                  f"number, got {value!r}.")
        # local_epochs, batch_size, lr and seed: TrainConfig's checks; epsilon, delta,
        # max_grad_norm and accountant: PrivacyConfig's (whatever the DP mode).
        self.train_config(0)
        self.privacy_config()

    def train_config(self, round_no: int = 0) -> TrainConfig:
        """A node's training for round ``round_no`` (``--dp local``: the job's epochs at a
        constant rate, no EMA; ``--dp distributed`` plans its one step from it too), with
        a seed of its own per round."""
        from privmed.training.config import TrainConfig

        batch = self.batch_size  # a bad one is TrainConfig's to refuse, not min()'s
        return TrainConfig(epochs=self.local_epochs, batch_size=batch,
                           physical_batch_size=min(batch, 1024) if is_whole(batch) else batch,
                           lr=self.lr,
                           lr_schedule="constant", ema_decay=None,
                           seed=self.seed * 100_003 + round_no)

    def privacy_config(self, unit: str = "auto", noise_multiplier: float | None = None
                       ) -> PrivacyConfig:
        """A node's DP-SGD settings: the job's ε for the whole job (or a fixed
        ``noise_multiplier`` once planned), δ, clipping norm and accountant, protecting
        ``unit`` ('patient', 'image' or 'auto')."""
        from privmed.privacy.config import PrivacyConfig

        return PrivacyConfig(target_epsilon=self.epsilon, delta=self.delta,
                             noise_multiplier=noise_multiplier,
                             max_grad_norm=self.max_grad_norm, accountant=self.accountant,
                             unit=unit)

    @property
    def private(self) -> bool:
        return self.dp != "none"

    @property
    def distributed(self) -> bool:
        return self.dp == "distributed"

    def stats_history(self) -> list[tuple[float, float, int]]:
        """The normalisation statistics as a DP mechanism: one Gaussian release on all data."""
        return [(self.norm_noise_multiplier, 1.0, 1)] if self.normalize and self.private else []

    def model_kwargs(self, image_shape: tuple[int, int, int]) -> dict[str, Any]:
        """Registry kwargs of the job's model, with the measured input statistics."""
        from privmed.models import model_kwargs

        kwargs = model_kwargs(self.model, image_shape)
        if self.input_mean is not None:
            kwargs.update(input_mean=list(self.input_mean), input_std=list(self.input_std or []))
        return kwargs

    def to_record(self) -> dict[str, Any]:
        """Flat, Flower-ConfigRecord-friendly form (no None values)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def split_record(cls, record: dict[str, Any]) -> tuple[FederationConfig, dict[str, Any]]:
        """A round request's config: the job, and the per-request keys beside it."""
        record = dict(record)
        extra = {k: record.pop(k) for k in _REQUEST_KEYS if k in record}
        return cls.from_record(record), extra

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FederationConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(record) - known
        if unknown:
            raise ConfigError(f"Unknown federation settings: {', '.join(sorted(unknown))}.")
        try:
            return cls(**dict(record))
        except TypeError as exc:
            raise ConfigError(f"Incomplete federation settings: {exc}.") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_rounds(dp: str | None, secure_agg: bool) -> int:
    """Rounds when none are asked for: 30 under distributed DP (one DP-SGD step each,
    cheap), 5 otherwise (each round trains ``local_epochs``)."""
    distributed = dp == "distributed" or (dp is None and secure_agg)
    return 30 if distributed else 5


def federation_job(job_id: str, model: str | None = None, *, rounds: int | None = None,
                   **settings: Any) -> FederationConfig:
    """A FederationConfig with privmed's defaults: the recommended model and
    :func:`default_rounds` (``settings``: the other FederationConfig fields)."""
    from privmed.models.registry import RECOMMENDED_MODEL

    if rounds is None:
        rounds = default_rounds(settings.get("dp"), settings.get("secure_agg", True))
    return FederationConfig(job_id=job_id, model=model or RECOMMENDED_MODEL, rounds=rounds,
                            **settings)
