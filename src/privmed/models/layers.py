"""DP-safe building blocks: no BatchNorm anywhere (it mixes samples in a
batch, which breaks per-sample gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups dividing ``channels``."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class WSConv2d(nn.Conv2d):
    """Convolution with weight standardisation (Qiao et al. 2019), which De et
    al. 2022 found important for DP-SGD with GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Standardize(nn.Module):
    """Fixed input standardisation ``(x - mean) / std``, per channel; no parameters.

    The defaults map pixels in [0, 1] to roughly zero mean, unit scale; a federated job
    replaces them with statistics measured (with DP) across the sites
    (``create_model(..., input_mean=..., input_std=...)``)."""

    def __init__(self, mean: float | list[float] = 0.5, std: float | list[float] = 0.25) -> None:
        super().__init__()
        self.set_statistics(mean, std)

    def set_statistics(self, mean: float | list[float], std: float | list[float]) -> None:
        self.mean = [float(v) for v in mean] if isinstance(mean, list | tuple) else float(mean)
        self.std = [float(v) for v in std] if isinstance(std, list | tuple) else float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mean, float) and isinstance(self.std, float):
            return (x - self.mean) / self.std
        shape = (1, -1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).reshape(shape)
        std = torch.as_tensor(self.std, dtype=x.dtype).reshape(shape)
        return (x - mean) / std

    def extra_repr(self) -> str:  # part of the fixed-feature cache key: must show the values
        return f"mean={self.mean}, std={self.std}"
