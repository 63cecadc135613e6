"""What a federated job asks of every node: the model, the rounds and the privacy plan.

The coordinator sends this (flattened) with every round; each node checks it and
decides its own clipping and noise from it (local DP: the data owner enforces privacy).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from privmed.errors import ConfigError

DPMode = Literal["local", "none"]
_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


@dataclass
class FederationConfig:
    """A federated job. ``epsilon`` is each node's target for the whole job (all rounds);
    ``min_nodes`` must be connected before the first round, later rounds go on with
    whichever nodes are connected."""

    job_id: str
    model: str
    rounds: int = 5
    local_epochs: int = 2
    batch_size: int = 256
    lr: float = 1e-2
    dp: DPMode = "local"
    epsilon: float = 3.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    seed: int = 0
    min_nodes: int = 1
    round_timeout: float = 600.0
    secure_agg: bool = True

    def __post_init__(self) -> None:
        if not _JOB_ID.match(self.job_id):
            raise ConfigError(f"Job id '{self.job_id}' may only hold letters, digits, '.', '_' "
                              "and '-' (at most 80).")
        for name in ("rounds", "local_epochs", "batch_size", "min_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', ' ').capitalize()} must be a positive "
                                  f"whole number, got {value!r}.")
        if self.dp not in ("local", "none"):
            raise ConfigError(f"Unknown DP mode '{self.dp}': use 'local' or 'none'.")
        for name in ("lr", "epsilon", "max_grad_norm", "round_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name.replace('_', ' ').capitalize()} must be a positive "
                                  f"number, got {value!r}.")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"Delta must lie strictly between 0 and 1, got {self.delta}.")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"Unknown accountant '{self.accountant}': use 'prv' or 'rdp'.")

    @property
    def private(self) -> bool:
        return self.dp != "none"

    def to_record(self) -> dict[str, Any]:
        """Flat, Flower-ConfigRecord-friendly form (no None values)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

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
