"""The images the compiler checks value ranges on, and what the model card calls them.

The ranges choose the output scale, which the public model card must carry (the client
multiplies the scores back by it), so whatever images calibrate leave a trace in the
card. By default they are synthetic, so that trace holds nothing of any patient:
privmed's generated chest X-rays (``data/synthetic.py``, a fixed seed) at the model's
input size plus uniform noise. ``public:DATA`` takes a public data set the model owner
vouches for; ``private`` takes the training images, and the card then says that its
output scale depends on them outside the differential-privacy guarantee.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privmed.errors import ConfigError

SYNTHETIC = "synthetic"
PRIVATE = "private (outside DP)"
SEED = 20_240_601  # fixed: the same model always compiles to the same public card
NOISE_FRACTION = 0.25  # noise widens the envelope beyond X-ray-like images


def calibration_images(dataset: Any, limit: int = 2000) -> np.ndarray:
    """Up to ``limit`` images of a foundation ``ImageDataset``, as numpy."""
    images = dataset.images[:limit]
    return images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def synthetic_images(shape: tuple[int, int, int], n: int = 2000) -> np.ndarray:
    """``n`` images of ``shape`` (C x H x W, in [0, 1]) made from no data at all."""
    from privmed.data import make_synthetic

    c, h, w = shape
    n_noise = int(n * NOISE_FRACTION)
    side = max(h, w, 8)
    xrays = calibration_images(make_synthetic(n_train=max(2, n - n_noise), n_val=0, n_test=0,
                                              size=side, seed=SEED).train)
    top, left = (side - h) // 2, (side - w) // 2
    xrays = np.repeat(xrays[:, :, top:top + h, left:left + w], c, axis=1)
    noise = np.random.default_rng(SEED).random((n_noise, c, h, w))
    return np.concatenate([xrays, noise]).astype(np.float64)


def calibration_set(spec: str, shape: tuple[int, int, int], n: int,
                    private: Callable[[], Any]) -> tuple[np.ndarray, str]:
    """Images for ``--calibration SPEC`` and the card's name for them; ``private()``
    gives the training data's bundle (read only for ``private``)."""
    if spec == "synthetic":
        return synthetic_images(shape, n), SYNTHETIC
    if spec == "private":
        return calibration_images(private().train, n), PRIVATE
    source = spec.removeprefix("public:").strip()
    if spec.startswith("public:") and source:
        from privmed.data import load_data

        size = shape[1] if shape[1] == shape[2] else None
        return (calibration_images(load_data(source, size=size).train, n),
                f"public:{Path(source).name}")
    raise ConfigError(f"--calibration takes 'synthetic', 'public:DATA' or 'private', not "
                      f"{spec!r}.")
