"""Masks: X25519 key agreement, HKDF-SHA256 key derivation, ChaCha20 as the PRG."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def load_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def pair_seed(own: X25519PrivateKey, other_public: bytes, run_id: bytes) -> bytes:
    """The 32-byte seed two nodes share: HKDF over their X25519 secret, bound to the run."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(other_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=run_id,
                info=b"privmed secagg pairwise mask").derive(shared)


def prg(seed: bytes, round_no: int, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` uniform integers in [0, 2^modulus_bits) from ChaCha20 keyed by ``seed``;
    the round number is the nonce, so one seed serves every round of a run."""
    # cryptography's 16-byte ChaCha20 nonce = 4-byte block counter + 12-byte nonce: the
    # counter starts at 0 and the round goes in the nonce, so rounds never share a stream.
    nonce = bytes(4) + round_no.to_bytes(12, "little")
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(
        bytes(8 * length))
    words = np.frombuffer(stream, dtype="<u8")
    return words & np.uint64((1 << modulus_bits) - 1)


def masked(value: np.ndarray, self_seed: bytes | None, pair_seeds: dict[int, bytes],
           own_id: int, round_no: int, modulus_bits: int) -> np.ndarray:
    """``value + PRG(self) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)`` mod 2^k (no
    ``PRG(self)`` without a self seed)."""
    mask = np.uint64((1 << modulus_bits) - 1)
    out = value & mask
    if self_seed is not None:
        out = (out + prg(self_seed, round_no, value.size, modulus_bits)) & mask
    for other, seed in pair_seeds.items():
        stream = prg(seed, round_no, value.size, modulus_bits)
        out = (out + stream) & mask if other > own_id else (out - stream) & mask
    return out
