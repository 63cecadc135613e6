"""The networks privmed ships. Every one trains under DP-SGD as is."""

from __future__ import annotations

import torch
from torch import nn

from privmed.models.layers import Standardize, WSConv2d, group_norm


class SmallCNN(nn.Module):
    """Three conv stages (GroupNorm, tanh) and a linear head.

    Tanh rather than ReLU: bounded activations keep clipped gradients more
    informative under DP-SGD (Papernot et al. 2021, tempered sigmoids).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32) -> None:
        super().__init__()
        widths = (width, width * 2, width * 2)
        layers: list[nn.Module] = [Standardize()]
        prev = in_channels
        for i, ch in enumerate(widths):
            layers += [nn.Conv2d(prev, ch, 3, padding=1), group_norm(ch), nn.Tanh()]
            layers.append(nn.AvgPool2d(2) if i < len(widths) - 1 else nn.AdaptiveAvgPool2d(2))
            prev = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = WSConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(c_out)
        self.conv2 = WSConv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(WSConv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          group_norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNetGN(nn.Module):
    """A small ResNet (one block per stage) with GroupNorm and weight
    standardisation, after De et al. 2022's recipe for DP-SGD."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 16,
                 blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(Standardize(),
                                  WSConv2d(in_channels, width, 3, padding=1, bias=False),
                                  group_norm(width), nn.ReLU())
        stages: list[nn.Module] = []
        prev = width
        for i, mult in enumerate((1, 2, 4)):
            ch = width * mult
            for b in range(blocks):
                stages.append(_Block(prev, ch, stride=2 if (i > 0 and b == 0) else 1))
                prev = ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
