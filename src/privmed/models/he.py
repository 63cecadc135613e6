"""Networks that can be evaluated on CKKS ciphertexts (``privmed encrypted compile``).

Only additions and multiplications exist under homomorphic encryption, so the
activation is a square and there is no pooling or normalisation that depends on
the data. The layout follows CryptoNets (Gilad-Bachrach et al. 2016): one
strided convolution, a hidden layer, a linear head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from privmed.models.layers import Standardize


class Square(nn.Module):
    """``x * x``: the cheapest polynomial activation (one ciphertext multiplication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class HECNN(nn.Module):
    """Standardize -> Conv2d (stride) -> x^2 -> Linear -> x^2 -> Linear.

    Defaults for 28 x 28 images: 4 channels of 7 x 7 at stride 3 give 4 x 8 x 8 = 256
    features, which fit one CKKS ciphertext of 4096 slots (docs/encrypted-inference.md).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2,
                 image_size: Sequence[int] = (28, 28), channels: int = 4, kernel: int = 7,
                 stride: int = 3, hidden: int = 32) -> None:
        super().__init__()
        h, w = (int(v) for v in image_size)
        oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"a {kernel}x{kernel} kernel does not fit {h}x{w} images")
        self.features = nn.Sequential(
            Standardize(),
            nn.Conv2d(in_channels, channels, kernel, stride=stride),
            Square(),
            nn.Flatten(),
            nn.Linear(channels * oh * ow, hidden),
            Square(),
        )
        self.head = nn.Linear(hidden, num_classes)
        # Squares compound scale: start small so activations stay near 1 (stable under
        # DP-SGD's clipping, and far from CKKS's modulus limits).
        for layer in (self.features[1], self.features[4], self.head):
            nn.init.xavier_uniform_(layer.weight, gain=0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
