"""Shamir t-of-n secret sharing of byte strings over the prime field GF(2^521 - 1), with
an authenticated secret: reconstruction from too few or corrupted shares is an error,
never a wrong secret."""

from __future__ import annotations

import hashlib
import secrets

from privmed.errors import ConfigError

PRIME = (1 << 521) - 1  # a Mersenne prime: any value of up to 65 bytes fits below it
_TAG = 16  # bytes of SHA-256 kept as the secret's tag: a random value passes with 2^-128
MAX_SECRET = 64 - _TAG - 1  # the marker byte, the secret and its tag stay below PRIME


class ShareError(ConfigError):
    """The shares do not reconstruct an authentic secret (too few, or corrupted)."""


def _tag(secret: bytes) -> bytes:
    return hashlib.sha256(b"privmed shamir tag" + secret).digest()[:_TAG]


def share(secret: bytes, threshold: int, count: int) -> list[tuple[int, int]]:
    """``count`` shares ``(x, y)`` of which any ``threshold`` recover ``secret``."""
    if not 1 <= threshold <= count:
        raise ConfigError(f"Need 1 <= threshold <= shares, got {threshold} of {count}.")
    if len(secret) > MAX_SECRET:
        raise ConfigError(f"Secrets of at most {MAX_SECRET} bytes can be shared.")
    # A leading 1 byte keeps leading zero bytes; the tag authenticates the secret.
    value = int.from_bytes(b"\x01" + secret + _tag(secret), "big")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [(x, evaluate(coefficients, x)) for x in range(1, count + 1)]


def evaluate(coefficients: list[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def interpolate(shares: list[tuple[int, int]], at: int = 0) -> int:
    """The value at ``at`` of the polynomial through ``shares`` (Lagrange)."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or not shares:
        raise ShareError("Shares must be distinct and non-empty.")
    value = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    return value


def recover(shares: list[tuple[int, int]]) -> bytes:
    """The secret from at least ``threshold`` distinct, correct shares.

    Raises :class:`ShareError` when the result is not authentic: fewer than ``threshold``
    shares, or a corrupted one, interpolate to an unrelated field element, whose tag
    matches with probability 2^-128."""
    value = interpolate(shares)
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if len(raw) < 1 + _TAG or raw[0] != 1:
        raise ShareError("The shares do not recover a secret (too few or corrupted).")
    secret, tag = raw[1:-_TAG], raw[-_TAG:]
    if not secrets.compare_digest(tag, _tag(secret)):
        raise ShareError("The shares do not recover a secret (too few or corrupted).")
    return secret
