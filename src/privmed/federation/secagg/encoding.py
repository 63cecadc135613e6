"""Fixed-point encoding of clipped float vectors into integers modulo 2^k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privmed.errors import ConfigError


@dataclass(frozen=True)
class FixedPoint:
    """``clip``: every value is clipped to [-clip, clip]; ``frac_bits``: precision;
    ``modulus_bits``: the ring Z_{2^k}; ``max_parties``: how many encoded vectors may be
    summed before the sum could wrap around (checked at construction)."""

    clip: float = 8.0
    frac_bits: int = 16
    modulus_bits: int = 48
    max_parties: int = 1024

    def __post_init__(self) -> None:
        if not (0 < self.modulus_bits <= 62):
            raise ConfigError("The ring must have between 1 and 62 bits.")
        if self.clip <= 0 or self.frac_bits < 0 or self.max_parties < 1:
            raise ConfigError("Clip, precision and party count must be positive.")
        largest = self.max_parties * self.clip * 2 ** self.frac_bits
        if largest >= 2 ** (self.modulus_bits - 1):
            raise ConfigError(
                f"A sum of {self.max_parties} values up to {self.clip:g} with "
                f"{self.frac_bits} fractional bits would overflow a {self.modulus_bits}-bit "
                "ring; lower one of them or widen the ring.")

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @property
    def quantum(self) -> float:
        """Rounding error bound per value and party: half a unit in the last place."""
        return 0.5 / 2 ** self.frac_bits

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Clip to ``[-clip, clip]`` and round; NaN or an infinity is refused (NaN would
        encode as 0 while its sender's weight still counted)."""
        values = np.asarray(values)
        if not np.all(np.isfinite(values)):
            raise ConfigError("The update holds NaN or infinite values: refusing to send it.")
        scaled = np.rint(np.clip(values.astype(np.float64), -self.clip, self.clip)
                         * 2 ** self.frac_bits).astype(np.int64)
        return np.mod(scaled, self.modulus).astype(np.uint64)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Inverse of ``encode`` for a value or a sum of at most ``max_parties`` values."""
        x = np.mod(encoded.astype(np.uint64), np.uint64(self.modulus)).astype(np.int64)
        x = np.where(x >= self.modulus // 2, x - self.modulus, x)
        return x.astype(np.float64) / 2 ** self.frac_bits

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a + b) & np.uint64(self.modulus - 1)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a - b) & np.uint64(self.modulus - 1)
