"""Shamir t-of-n secret sharing of byte strings over the prime field GF(2^521 - 1)."""

from __future__ import annotations

import secrets

from privmed.errors import ConfigError

PRIME = (1 << 521) - 1  # a Mersenne prime: any secret of up to 64 bytes fits below it


def share(secret: bytes, threshold: int, count: int) -> list[tuple[int, int]]:
    """``count`` shares ``(x, y)`` of which any ``threshold`` recover ``secret``."""
    if not 1 <= threshold <= count:
        raise ConfigError(f"Need 1 <= threshold <= shares, got {threshold} of {count}.")
    if len(secret) > 64:
        raise ConfigError("Secrets of at most 64 bytes can be shared.")
    # Prefix a 1 byte so that leading zero bytes survive the round trip.
    value = int.from_bytes(b"\x01" + secret, "big")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def recover(shares: list[tuple[int, int]]) -> bytes:
    """The secret from at least ``threshold`` distinct shares (Lagrange at 0)."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or not shares:
        raise ConfigError("Shares must be distinct and non-empty.")
    value = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1:
        raise ConfigError("The shares do not recover a secret (too few or corrupted).")
    return raw[1:]
