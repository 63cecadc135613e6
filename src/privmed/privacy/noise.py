"""Cryptographically secure randomness for every DP release: Gaussian noise and Poisson sampling.

torch's and numpy's generators are Mersenne Twisters, and torch keeps only the low 32 bits
of a seed: 2^32 guesses recover a whole noise stream and subtract it from a release. Each
:class:`SecureRandom` instead holds a 256-bit key from :func:`secrets.token_bytes` (never
derived from a user's seed, never saved, never pickled) and expands it with ChaCha20
(pyca ``cryptography``, i.e. OpenSSL):

* uniforms: float64 ``k / 2^53`` in [0, 1) from the top 53 bits of 64-bit keystream words;
* Bernoulli masks (Poisson sampling): ``uniform < q``, so ``q = 1`` keeps every record;
* Gaussians: Box-Muller in float64; each returned value is the sum of four standard normals
  from four different uniform pairs, divided by two, scaled by ``std`` and only then cast
  to the caller's dtype: Opacus's ``secure_mode`` counter-measure against floating-point
  attacks on the sampler (Holohan & Braghin 2021, arXiv:2107.10138, section 5.1, n = 2).

Keystream is drawn on the CPU and transformed on the caller's device. Exact samplers were
rejected for speed: OpenDP 0.16's ``make_gaussian`` (a CSPRNG too) took 54 us per value on
this project's 2-core machine, 4 s a step for ResNet-GN's 77k parameters, where this takes
about 3 ms, 14 times torch.normal's 0.2 ms (``benchmarks/dp_overhead.py`` prints both).
"""

from __future__ import annotations

import math
import os
import secrets
import threading
from collections.abc import Sequence
from typing import NoReturn

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

# Values per transform step. CPU: 8000 values are 32000 uniforms, under torch's parallel grain
# (32768): every op runs on one thread in cache, never waiting at a barrier for a busy core.
# GPU: large steps, few kernel launches; either bounds memory on any model.
_CPU_CHUNK, _GPU_CHUNK = 8_000, 1 << 20
# Keystream bytes per nonce: 2^24 blocks, so OpenSSL's block counter (32 or 64 bits, by version)
# never wraps into the nonce.
_STREAM_BYTES = 1 << 30
_MANTISSA = (1 << 53) - 1
_SCALE = 2.0 ** -53


class SecureRandom:
    """A ChaCha20 stream under a fresh 256-bit OS key; thread-safe, rekeyed after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rekey()

    def _rekey(self) -> None:
        self._key = secrets.token_bytes(32)
        self._pid = os.getpid()
        self._nonce = 0  # one nonce per keystream request: no (key, nonce) is ever reused

    def __reduce__(self) -> NoReturn:  # pickle, copy and torch.save all go through here
        raise TypeError("A SecureRandom is never pickled or copied: its key stays in memory.")

    def __repr__(self) -> str:
        return "SecureRandom(ChaCha20, 256-bit key from the OS)"

    def words(self, n: int) -> torch.Tensor:
        """``n`` fresh 64-bit keystream words as a CPU int64 tensor."""
        out = torch.empty(n, dtype=torch.int64)
        buf = memoryview(out.numpy()).cast("B")
        for start in range(0, len(buf), _STREAM_BYTES):
            part = buf[start:start + _STREAM_BYTES]
            self._encryptor().update_into(bytes(len(part)), part)  # keystream = E(zeros)
        return out

    def _encryptor(self) -> CipherContext:
        with self._lock:
            if os.getpid() != self._pid:  # a forked child must never replay its parent's stream
                self._rekey()
            key, nonce = self._key, self._nonce
            self._nonce += 1
        # IV: the block counter (8 bytes, from 0), then this request's nonce.
        iv = bytes(8) + nonce.to_bytes(8, "little")
        return Cipher(algorithms.ChaCha20(key, iv), mode=None).encryptor()

    def uniform(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` float64 uniforms ``k / 2^53``, ``k`` uniform in [0, 2^53), on ``device``."""
        words = self.words(n).to(device)
        # An arithmetic shift then the mask: the top 53 bits, whatever the sign bit was.
        return words.bitwise_right_shift_(11).bitwise_and_(_MANTISSA).double().mul_(_SCALE)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent booleans, each True with probability ``p`` (up to 2^-53)."""
        if not 0 <= p <= 1:
            raise ValueError(f"A probability must lie in [0, 1], got {p}.")
        return self.uniform(n) < p

    def gaussian(self, shape: Sequence[int] | int, std: float, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Independent ``N(0, std^2)`` values of ``shape`` on ``device`` in ``dtype``."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = math.prod(shape)
        if not std >= 0 or not math.isfinite(std):
            raise ValueError(f"The noise standard deviation must be finite and >= 0, got {std}.")
        if std == 0:
            return torch.zeros(shape, device=device, dtype=dtype)
        out = torch.empty(n, device=device, dtype=dtype)
        chunk = _CPU_CHUNK if out.device.type == "cpu" else _GPU_CHUNK
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            out[start:stop] = self._standard(stop - start, out.device).mul_(std).to(dtype)
        return out.view(shape)

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """Noise of ``reference``'s shape, device and dtype (as Opacus's ``_generate_noise``)."""
        return self.gaussian(reference.shape, std, device=reference.device,
                             dtype=reference.dtype)

    def _standard(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` float64 N(0, 1): each the sum of four Box-Muller normals, halved."""
        m = max(n, 2)  # four *different* pairs per value need at least two columns
        u = self.uniform(4 * m, device)
        # 1 - u is exact on the 2^-53 grid and lies in (0, 1]; log is vectorised, log1p is not.
        radius = u[:2 * m].neg_().add_(1.0).log_().mul_(-2.0).sqrt_()
        angle = u[2 * m:].mul_(2 * math.pi)
        cos = torch.cos(angle).mul_(radius).view(2, m)
        sin = angle.sin_().mul_(radius).view(2, m)  # in place: the angles are no longer needed
        out = cos[0] + cos[1]  # pairs j and m + j
        sin = sin[0] + sin[1]
        out[1:] += sin[:-1]  # pairs j - 1 and m + j - 1 (mod m): never those of the cosines
        out[0] += sin[-1]
        return out.mul_(0.5)[:n]
