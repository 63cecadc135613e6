"""CKKS parameters, keys and (de)serialisation on Microsoft SEAL (TenSEAL's ``sealapi``).

Why the low-level ``sealapi`` rather than TenSEAL's tensors: TenSEAL generates Galois
keys for every rotation (a 97 MB context) and exposes no rotation by a chosen step;
privmed needs twelve power-of-two rotations and seeded (half-size) ciphertexts and keys,
which SEAL offers directly. OpenFHE's PyPI wheel ships a CPython 3.10 extension only.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from privmed.errors import ConfigError

SECURITY_BITS = 128


@dataclass(frozen=True)
class CKKSParams:
    """Ring degree, coefficient-modulus prime sizes (first, depth x scale, special), scale."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Multiplications a fresh ciphertext can take (one rescale each)."""
        return len(self.coeff_modulus_bits) - 2

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

    def to_dict(self) -> dict[str, Any]:
        return {"poly_modulus_degree": self.poly_modulus_degree,
                "coeff_modulus_bits": list(self.coeff_modulus_bits),
                "scale_bits": self.scale_bits, "security_bits": SECURITY_BITS,
                "depth": self.depth}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CKKSParams:
        return cls(int(d["poly_modulus_degree"]), tuple(int(b) for b in d["coeff_modulus_bits"]),
                   int(d["scale_bits"]))


def max_modulus_bits(poly_modulus_degree: int) -> int:
    """Largest total coefficient modulus with 128-bit security (HE standard, via SEAL)."""
    return int(seal.CoeffModulus.MaxBitCount(poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128))


def choose_params(depth: int, *, scale_bits: int = 26, headroom_bits: int = 5,
                  min_slots: int = 4096) -> CKKSParams:
    """The smallest ring with ``min_slots`` slots and ``depth`` levels at 128-bit security.

    The first prime holds the result: values up to ``2**(headroom_bits - 1)`` decrypt
    correctly at the last level; larger ones wrap around silently, which is why the
    compiler checks ranges against this bound.
    """
    first = special = scale_bits + headroom_bits
    bits = (first, *([scale_bits] * depth), special)
    for degree in (8192, 16384, 32768):
        if degree // 2 >= min_slots and sum(bits) <= max_modulus_bits(degree):
            return CKKSParams(degree, bits, scale_bits)
    raise ConfigError(f"No 128-bit-secure CKKS ring up to degree 32768 has depth {depth} at "
                      f"scale 2^{scale_bits}; the model needs fewer layers.")


def seal_context(params: CKKSParams) -> seal.SEALContext:
    p = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    p.set_poly_modulus_degree(params.poly_modulus_degree)
    p.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree,
                                                 list(params.coeff_modulus_bits)))
    ctx = seal.SEALContext(p, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise ConfigError(f"CKKS parameters {params.to_dict()} are not valid at 128-bit "
                          f"security: {ctx.parameters_error_message()}.")
    return ctx


def rotation_steps(slots: int) -> list[int]:
    """Every power of two below ``slots``: the rotations single-image inference uses."""
    return [1 << i for i in range(slots.bit_length() - 1)]


def galois_elements(steps: list[int], poly_modulus_degree: int) -> list[int]:
    """SEAL's Galois element for a left rotation by ``step`` is 3^step mod 2N."""
    return [pow(3, s, 2 * poly_modulus_degree) for s in steps]


# --- bytes <-> SEAL objects ------------------------------------------------------------
# The sealapi binding saves and loads through file paths only, so bytes go through a
# private temporary file (in RAM where /dev/shm exists).
_TMP_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def to_bytes(obj: Any) -> bytes:
    """Serialise a SEAL object or a seeded ``Serializable`` (SEAL's zstd compression)."""
    fd, name = tempfile.mkstemp(prefix="privmed-", dir=_TMP_ROOT)
    os.close(fd)
    try:
        obj.save(name)
        return Path(name).read_bytes()
    finally:
        os.unlink(name)


def from_bytes(cls: type, ctx: seal.SEALContext, data: bytes) -> Any:
    """Load a ``cls`` (Ciphertext, RelinKeys, GaloisKeys) and check it is valid for ``ctx``.

    Raises ValueError on anything SEAL rejects (malformed, wrong parameters)."""
    obj = cls()
    fd, name = tempfile.mkstemp(prefix="privmed-", dir=_TMP_ROOT)
    try:
        os.write(fd, data)
        os.close(fd)
        obj.load(ctx, name)  # SEAL validates the object against the context here
    except Exception as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    finally:
        os.unlink(name)
    return obj


class Encoder:
    """Encode float vectors and scalars at a given level and scale."""

    def __init__(self, ctx: seal.SEALContext) -> None:
        self.ctx = ctx
        self._encoder = seal.CKKSEncoder(ctx)
        self.slots = self._encoder.slot_count()

    def vector(self, values: np.ndarray, parms_id: Any, scale: float) -> seal.Plaintext:
        if len(values) > self.slots:
            raise ValueError(f"{len(values)} values do not fit {self.slots} slots")
        pt = seal.Plaintext()
        self._encoder.encode(np.asarray(values, dtype=np.float64).tolist(), parms_id, scale, pt)
        return pt

    def scalar(self, value: float, parms_id: Any, scale: float) -> seal.Plaintext:
        pt = seal.Plaintext()
        self._encoder.encode(float(value), parms_id, scale, pt)
        return pt

    def decode(self, pt: seal.Plaintext) -> np.ndarray:
        return np.asarray(self._encoder.decode_double(pt), dtype=np.float64)


class SecretKeys:
    """The client's keys. The secret key never leaves this object except by ``save``."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.ctx = seal_context(params)
        self._keygen = seal.KeyGenerator(self.ctx)
        self._secret = self._keygen.secret_key()
        self._encryptor = seal.Encryptor(self.ctx, self._secret)
        self._decryptor = seal.Decryptor(self.ctx, self._secret)
        self.encoder = Encoder(self.ctx)

    def evaluation_keys(self, *, rotations: bool) -> dict[str, bytes]:
        """Relinearisation keys (and Galois keys for ``rotations``), seeded: public material
        the server needs to compute, from which the secret key cannot be derived."""
        keys = {"relin_keys": to_bytes(self._keygen.create_relin_keys())}
        if rotations:
            elts = galois_elements(rotation_steps(self.params.slots),
                                   self.params.poly_modulus_degree)
            keys["galois_keys"] = to_bytes(self._keygen.create_galois_keys(elts))
        return keys

    def secret_key_bytes(self) -> bytes:
        return to_bytes(self._secret)

    def encrypt(self, values: np.ndarray) -> bytes:
        """Encrypt a vector (zero-padded to the slot count) at the top level, seeded."""
        pt = self.encoder.vector(values, self.ctx.first_parms_id(), self.params.scale)
        return to_bytes(self._encryptor.encrypt_symmetric(pt))

    def decrypt(self, data: bytes) -> np.ndarray:
        ct = from_bytes(seal.Ciphertext, self.ctx, data)
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return self.encoder.decode(pt)
