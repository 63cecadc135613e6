"""Where each value sits in the CKKS slots, for both encodings. Shared by client and server.

Single image (one ciphertext, ``slots = blocks x P_w``): the client sends the im2col
matrix with kernel position ``k`` in block ``k`` and window ``w`` at offset ``w``. The
server multiplies by the kernel, sums the blocks with rotations (every block then holds
the convolution), squares, multiplies by the hidden layer's rows (row ``j`` in block
``j``), sums inside each block, squares, and sums the head's weighted blocks so that
every block holds the scores at fixed offsets and nothing else.

Batch (SIMD over images): one ciphertext per pixel position, slot ``i`` = image ``i``;
the network runs as scalar weighted sums of ciphertexts, with no rotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Geometry:
    """The network's shape: input, convolution, hidden layer, classes."""

    in_channels: int
    height: int
    width: int
    kernel: int
    stride: int
    conv_channels: int
    hidden: int
    classes: int

    @property
    def out_h(self) -> int:
        return (self.height - self.kernel) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.width - self.kernel) // self.stride + 1

    @property
    def windows(self) -> int:
        return self.out_h * self.out_w

    @property
    def kernel_size(self) -> int:
        return self.in_channels * self.kernel * self.kernel

    @property
    def pixels(self) -> int:
        return self.in_channels * self.height * self.width

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("in_channels", "height", "width", "kernel",
                                              "stride", "conv_channels", "hidden", "classes")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(**{k: int(d[k]) for k in ("in_channels", "height", "width", "kernel",
                                             "stride", "conv_channels", "hidden", "classes")})


@dataclass(frozen=True)
class SingleLayout:
    geometry: Geometry
    slots: int

    @property
    def block(self) -> int:
        """Slots per block (``P_w``): windows padded to a power of two."""
        return next_pow2(self.geometry.windows)

    @property
    def blocks(self) -> int:
        return self.slots // self.block

    def problems(self) -> list[str]:
        """Why this network cannot use the single-ciphertext layout (empty when it can)."""
        g, out = self.geometry, []
        if next_pow2(g.kernel_size) > self.blocks:
            out.append(f"the convolution's {g.kernel_size} kernel positions x {g.windows} "
                       f"windows do not fit {self.slots} slots")
        if g.hidden > self.blocks:
            out.append(f"the hidden layer's {g.hidden} units exceed {self.blocks} blocks")
        if g.classes > self.block:
            out.append(f"{g.classes} classes exceed {self.block} slots per block")
        return out

    def block_sum_steps(self) -> list[int]:
        """Rotations that add all blocks together (each block then holds the total)."""
        return [self.block << i for i in range(self.blocks.bit_length() - 1)]

    def in_block_sum_steps(self) -> list[int]:
        """Rotations that put each block's sum into its first slot."""
        return [1 << i for i in range(self.block.bit_length() - 1)]

    def class_offsets(self) -> list[int]:
        """Offset of each class's score inside every block: a left rotation by ``o`` moves
        block ``j``'s first slot to offset ``block - o`` of block ``j - 1``."""
        return [(self.block - o) % self.block for o in range(self.geometry.classes)]

    def conv_slots(self) -> np.ndarray:
        """``[kernel_size, windows]``: the slot of kernel position ``k`` of window ``w``
        (block ``k``, offset ``w``): where the client puts the im2col matrix and the server
        the kernel weights."""
        g = self.geometry
        return np.arange(g.kernel_size)[:, None] * self.block + np.arange(g.windows)[None, :]

    def hidden_slots(self) -> np.ndarray:
        """``[hidden, windows]``: row ``j`` of the hidden layer sits in block ``j``."""
        g = self.geometry
        return np.arange(g.hidden)[:, None] * self.block + np.arange(g.windows)[None, :]

    def score_slots(self) -> np.ndarray:
        """Every slot that holds a score: ``[class, block]``."""
        offs = np.asarray(self.class_offsets())[:, None]
        return offs + self.block * np.arange(self.blocks)[None, :]


def im2col_indices(g: Geometry) -> np.ndarray:
    """``[windows, kernel_size]`` flat pixel index of each window's kernel position, in
    PyTorch's orders (windows row-major; kernel as ``weight.reshape(C_out, -1)``)."""
    c, ky, kx = np.meshgrid(np.arange(g.in_channels), np.arange(g.kernel), np.arange(g.kernel),
                            indexing="ij")
    oy, ox = np.meshgrid(np.arange(g.out_h), np.arange(g.out_w), indexing="ij")
    ys = oy.reshape(-1, 1) * g.stride + ky.reshape(1, -1)
    xs = ox.reshape(-1, 1) * g.stride + kx.reshape(1, -1)
    return (c.reshape(1, -1) * g.height + ys) * g.width + xs


def pack_single(layout: SingleLayout, image: np.ndarray) -> np.ndarray:
    """One image ``C x H x W`` -> the slot vector the client encrypts."""
    flat = np.asarray(image, dtype=np.float64).reshape(-1)
    vec = np.zeros(layout.slots)
    vec[layout.conv_slots()] = flat[im2col_indices(layout.geometry)].T  # [k, windows]
    return vec


def unpack_single(layout: SingleLayout, slots: np.ndarray) -> np.ndarray:
    """Decrypted result -> ``classes`` scores (the copy in block 0)."""
    return np.asarray(slots)[layout.class_offsets()]


def pack_batch(images: np.ndarray, slots: int) -> np.ndarray:
    """``N x C x H x W`` (N <= slots) -> ``[pixels, slots]``: row p is pixel p of every image."""
    n = images.shape[0]
    if n > slots:
        raise ValueError(f"{n} images exceed {slots} slots")
    out = np.zeros((int(np.prod(images.shape[1:])), slots))
    out[:, :n] = images.reshape(n, -1).T
    return out
