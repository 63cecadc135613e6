"""Hyper-parameters of one call to :func:`privmed.training.fit`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from privmed.errors import ConfigError


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is the *expected* logical batch under DP
    (Poisson sampling rate q = batch_size / N); ``physical_batch_size`` caps
    memory by splitting a logical batch into chunks.

    ``seed`` makes initialisation and data order reproducible. The DP noise and
    Poisson sampling draw from a separate generator seeded from the operating
    system's entropy, because anyone who knows that seed could subtract the
    noise; ``noise_seed`` fixes it for tests only (it is then written into
    results.json, and the release has no privacy against its readers)."""

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
    noise_seed: int | None = None
    eval_batch_size: int = 512
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"
    checkpoint_dir: Path | None = None
    resume: bool = False
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"Epochs must be at least 1, got {self.epochs}.")
        if self.batch_size < 1 or self.physical_batch_size < 1:
            raise ConfigError("Batch sizes must be at least 1.")
        if not self.lr > 0:
            raise ConfigError(f"The learning rate must be positive, got {self.lr}.")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"EMA decay must lie in [0, 1), got {self.ema_decay}.")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint_dir"] = str(self.checkpoint_dir) if self.checkpoint_dir else None
        return d
