"""ScatterNet classifiers (Tramer & Boneh 2021, "Differentially Private
Learning Needs Better Features"): a fixed wavelet scattering transform, which
learns nothing from data and so costs no privacy, followed by a small
trainable head. On small medical datasets they beat end-to-end CNNs under
DP-SGD, because the noise only has to train the head.

``fit()`` sees the ``fixed_features`` attribute and computes the scattering
coefficients of the training set once instead of on every step.
"""

from __future__ import annotations

import torch
from torch import nn

from privmed.models.layers import Standardize, group_norm


def _scattering(shape: tuple[int, int], J: int, L: int) -> nn.Module:
    # kymatio's top-level package imports its 3-D frontend, which needs
    # scipy.special.sph_harm (removed in SciPy 1.15); the 2-D one does not.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=shape, L=L)


class ScatterFeatures(nn.Module):
    """Scattering coefficients ``N x C*K x H/2^J x W/2^J`` (K = 1 + JL + L^2 J(J-1)/2)."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], J: int = 2,
                 L: int = 8) -> None:
        super().__init__()
        if image_size[0] % (2 ** J) or image_size[1] % (2 ** J):
            raise ValueError(f"image size {image_size} must be divisible by 2^J = {2 ** J}")
        # Identity unless a federated job sets measured statistics (create_model).
        self.standardize = Standardize(0.0, 1.0)
        self.scattering = _scattering(tuple(image_size), J, L)
        k = 1 + J * L + L * L * J * (J - 1) // 2
        self.out_channels = in_channels * k
        self.out_size = (image_size[0] // 2 ** J, image_size[1] // 2 ** J)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scattering(self.standardize(x).contiguous())
        return out.reshape(x.shape[0], self.out_channels, *self.out_size)


class ScatterHead(nn.Module):
    """Normalisation (no learned statistics) then a linear or small CNN head."""

    def __init__(self, channels: int, size: tuple[int, int], num_classes: int,
                 head: str = "linear", width: int = 32) -> None:
        super().__init__()
        # Per-sample normalisation over channel groups: needs no data statistics
        # (which would themselves cost privacy).
        self.norm = nn.GroupNorm(next(g for g in (27, 9, 3, 1) if channels % g == 0),
                                 channels, affine=False)
        if head == "linear":
            self.body: nn.Module = nn.Flatten()
            features = channels * size[0] * size[1]
        else:
            self.body = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1), group_norm(width), nn.Tanh(),
                nn.Conv2d(width, width, 3, padding=1), group_norm(width), nn.Tanh(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            features = width
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.norm(x)))


class ScatterNet(nn.Module):
    """Fixed scattering features + trainable head; see the module docstring."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2,
                 image_size: tuple[int, int] = (28, 28), head: str = "linear", J: int = 2,
                 L: int = 8, width: int = 32) -> None:
        super().__init__()
        self.fixed_features = ScatterFeatures(in_channels, tuple(image_size), J, L)
        self.head = ScatterHead(self.fixed_features.out_channels, self.fixed_features.out_size,
                                num_classes, head, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fixed_features(x))
