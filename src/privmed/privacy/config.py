"""What a user asks of differential privacy for one training run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from privmed.checks import is_positive
from privmed.errors import ConfigError

#: Used when neither ``--epsilon`` nor ``--noise-multiplier`` is given: a
#: moderate guarantee that still trains useful models on ~5k images.
DEFAULT_EPSILON = 3.0

Accountant = Literal["prv", "rdp"]


def default_delta(n: int) -> float:
    """The largest power of ten that is at most 1 / (10 N), so delta < 1/N always."""
    if n <= 0:
        raise ConfigError("Cannot choose delta for an empty dataset.")
    return 10.0 ** math.floor(math.log10(1.0 / (10.0 * n)))


@dataclass
class PrivacyConfig:
    """DP-SGD settings.

    Give ``target_epsilon`` (the noise multiplier is calibrated to reach it
    after the planned steps) or ``noise_multiplier`` (epsilon then follows
    from the accountant). ``delta=None`` means :func:`default_delta` of the
    training-set size.
    """

    target_epsilon: float | None = DEFAULT_EPSILON
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    accountant: Accountant = "prv"
    #: What ε protects: "patient" (all of a patient's images together), "image", or "auto"
    #: (patient whenever the training data names the patients).
    unit: str = "auto"

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None:
            self.target_epsilon = None
            if not is_positive(self.noise_multiplier):
                raise ConfigError(
                    f"The noise multiplier must be positive, got {self.noise_multiplier}.")
        elif self.target_epsilon is None:
            raise ConfigError("Give either a target epsilon or a noise multiplier.")
        elif not is_positive(self.target_epsilon):
            raise ConfigError(f"Epsilon must be a positive number, got {self.target_epsilon}.")
        if self.delta is not None and not (is_positive(self.delta) and self.delta < 1):
            raise ConfigError(f"Delta must lie strictly between 0 and 1, got {self.delta}.")
        if not is_positive(self.max_grad_norm):
            raise ConfigError(f"The clipping norm must be a positive number, got "
                              f"{self.max_grad_norm!r}.")
        if self.unit not in ("auto", "patient", "image"):
            raise ConfigError(f"Unknown privacy unit '{self.unit}': use 'patient', 'image' "
                              "or 'auto'.")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"Unknown accountant '{self.accountant}': use 'prv' or 'rdp'.")

    def resolved_delta(self, n: int, unit: str = "image") -> float:
        """δ for ``n`` protected units (patients or images): the given one, else
        :func:`default_delta`; refused unless below 1/n."""
        delta = self.delta if self.delta is not None else default_delta(n)
        if delta >= 1.0 / n:
            raise ConfigError(
                f"Delta {delta:g} is not below 1/N = {1.0 / n:.2g} for {n} training {unit}s; "
                "such a guarantee would allow leaking a whole record.")
        return delta

    def to_dict(self) -> dict:
        return asdict(self)
