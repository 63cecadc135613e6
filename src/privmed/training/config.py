"""Hyper-parameters of one call to :func:`privmed.training.fit`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from privmed.checks import is_positive, is_whole
from privmed.errors import ConfigError


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is the *expected* logical batch under DP
    (Poisson sampling rate q = batch_size / N); ``physical_batch_size`` caps
    memory by splitting a logical batch into chunks.

    ``seed`` makes initialisation (and, without DP, the data order)
    reproducible. Under DP, Poisson sampling and noise come from
    :class:`privmed.privacy.SecureRandom`, keyed afresh from the operating
    system on every run and never from ``seed``: anyone who knows a seed of
    the noise could subtract it, so no option fixes it."""

    # Defaults suit DP-SGD on the recommended ScatterNet model: large batches
    # and a high learning rate (Tramer & Boneh 2021; docs/benchmarks.md).
    epochs: int = 30
    batch_size: int = 1024
    physical_batch_size: int = 1024
    lr: float = 1e-2
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    ema_decay: float | None = 0.9
    seed: int = 0
    eval_batch_size: int = 512
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"
    checkpoint_dir: Path | None = None
    resume: bool = False
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if not is_whole(self.epochs, 1):
            raise ConfigError(f"Epochs must be a whole number of at least 1, got "
                              f"{self.epochs!r}.")
        for name in ("batch_size", "physical_batch_size"):
            if not is_whole(getattr(self, name), 1):
                raise ConfigError(f"The {name.replace('_', ' ')} must be a whole number of "
                                  f"at least 1, got {getattr(self, name)!r}.")
        if not is_positive(self.lr):
            raise ConfigError(f"The learning rate must be a positive number, got {self.lr!r}.")
        if not is_whole(self.seed):
            raise ConfigError(f"The seed must be a whole number, got {self.seed!r}.")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"EMA decay must lie in [0, 1), got {self.ema_decay}.")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint_dir"] = str(self.checkpoint_dir) if self.checkpoint_dir else None
        return d
