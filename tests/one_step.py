"""One full-batch SGD step of a zero-initialised linear model: the update is the (clipped,
noised) gradient itself, so tests can read DP-SGD's clipping and noise off the weights."""

from __future__ import annotations

import torch
from torch import nn

from privmed.data.dataset import ImageDataset
from privmed.privacy import PrivacyConfig
from privmed.training import TrainConfig, fit


class ScaledLinear(nn.Module):
    """Zero-initialised linear logits scaled by 100: unsaturated softmax and
    per-sample gradients far above any clipping norm the tests use."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(pixels, 2)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * self.fc(x.flatten(1))


def one_step_update(data: ImageDataset, privacy: PrivacyConfig | None) -> torch.Tensor:
    """The weights after one step (q = 1, lr 1, SGD) from zero, torch seeded alike: the
    update itself."""
    torch.manual_seed(0)
    model = ScaledLinear(data.images[0].numel())
    cfg = TrainConfig(epochs=1, batch_size=len(data), physical_batch_size=len(data),
                      optimizer="sgd", momentum=0.0, lr=1.0, lr_schedule="constant",
                      ema_decay=None, seed=3, num_threads=1)
    result = fit(model, data, None, cfg, privacy)
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])
