"""Deterministic synthetic "chest X-ray" images for demos, tests and benchmarks.

Each image has a torso ellipse, two dark lung fields with rib shadows, a heart shadow,
varying anatomy, brightness, contrast and noise. Class ``opacity`` adds one to three soft,
diffuse bright patches of random position, size and intensity inside the lungs; some are
faint, so the task is learnable but not trivially separable from raw pixels.
"""

from __future__ import annotations

import numpy as np

from privmed.data.dataset import DataBundle, ImageDataset
from privmed.errors import ConfigError

CLASS_NAMES = ("normal", "opacity")
POSITIVE_FRACTION = 0.6  # about 40 / 60 normal / opacity, like PneumoniaMNIST's skew
_CHUNK = 512  # images rendered at once; bounds memory at large sizes
_MAX_BLOBS = 3


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def _draw_params(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image anatomy, acquisition and lesion parameters (all drawn up front)."""
    n = labels.shape[0]

    def u(lo: float, hi: float, shape: tuple[int, ...] = ()) -> np.ndarray:
        return rng.uniform(lo, hi, (n, *shape)).astype(np.float32)

    p = {
        "cx": u(-0.07, 0.07), "cy": u(-0.04, 0.08), "ax": u(0.72, 0.92), "ay": u(0.95, 1.15),
        "tissue": u(0.45, 0.65), "lung_sep": u(0.30, 0.42), "lung_w": u(0.19, 0.27),
        "lung_h": u(0.45, 0.62), "lung_dy": u(-0.14, 0.0), "lung_asym": u(0.88, 1.06),
        "lung_depth": u(0.22, 0.42), "heart_amp": u(0.08, 0.22), "heart_s": u(0.15, 0.24),
        "rib_f": u(3.0, 4.5), "rib_phase": u(0.0, 1.0), "rib_curv": u(0.3, 0.8),
        "rib_amp": u(0.03, 0.10), "gain": u(0.75, 1.25), "offset": u(-0.08, 0.08),
        "noise": u(0.02, 0.06),
        # Lesions: side (+-1), position inside that lung, size, strength, how many.
        "b_side": np.where(rng.random((n, _MAX_BLOBS)) < 0.5, -1.0, 1.0).astype(np.float32),
        "b_u": u(-0.6, 0.6, (_MAX_BLOBS,)), "b_v": u(-0.7, 0.7, (_MAX_BLOBS,)),
        "b_sigma": u(0.10, 0.26, (_MAX_BLOBS,)), "b_amp": u(0.0, 0.32, (_MAX_BLOBS,)),
        "b_count": rng.integers(1, _MAX_BLOBS + 1, n),
    }
    present = (np.arange(_MAX_BLOBS)[None, :] < p["b_count"][:, None]) & (labels[:, None] == 1)
    p["b_amp"] = (p["b_amp"] + 0.06) * present  # at least a faint patch when present
    return p


def _render(p: dict[str, np.ndarray], sl: slice, size: int,
            rng: np.random.Generator) -> np.ndarray:
    """Render images ``sl`` of the parameter set as float32 ``n x size x size``."""
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = g[None, :, None], g[None, None, :]

    def q(key: str) -> np.ndarray:
        return p[key][sl][:, None, None]

    cx, cy = q("cx"), q("cy")
    torso = _sigmoid((1.0 - ((xx - cx) / q("ax")) ** 2 - ((yy - cy) / q("ay")) ** 2) * 8.0)
    ly = cy + q("lung_dy")
    lx_l, lx_r = cx - q("lung_sep"), cx + q("lung_sep")
    w_l, w_r, h = q("lung_w"), q("lung_w") * q("lung_asym"), q("lung_h")
    left = _sigmoid((1.0 - ((xx - lx_l) / w_l) ** 2 - ((yy - ly) / h) ** 2) * 6.0)
    right = _sigmoid((1.0 - ((xx - lx_r) / w_r) ** 2 - ((yy - ly) / h) ** 2) * 6.0)
    lungs = np.maximum(left, right)
    heart = np.exp(-((xx - cx - 0.12) ** 2 + (yy - ly - 0.3) ** 2) / (2 * q("heart_s") ** 2))
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (q("rib_f") * yy + q("rib_curv") * xx**2
                                            + q("rib_phase")))) ** 3
    img = (q("tissue") * torso - q("lung_depth") * lungs + q("rib_amp") * ribs * lungs
           + q("heart_amp") * heart * torso)

    lesions = np.zeros_like(img)
    for b in range(_MAX_BLOBS):  # at most three blobs: a loop over blobs, not pixels
        side = p["b_side"][sl, b][:, None, None]
        bx = cx + side * q("lung_sep") + p["b_u"][sl, b][:, None, None] * w_l
        by = ly + p["b_v"][sl, b][:, None, None] * h
        s = p["b_sigma"][sl, b][:, None, None]
        amp = p["b_amp"][sl, b][:, None, None]
        lesions += amp * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * s**2))
    img = img + lesions * lungs
    img = img * q("gain") + q("offset")
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * q("noise")
    return img


def _make_split(seed_seq: np.random.SeedSequence, n: int, size: int, name: str
                ) -> ImageDataset:
    rng = np.random.default_rng(seed_seq)
    n_pos = int(round(POSITIVE_FRACTION * n))
    labels = rng.permutation(np.r_[np.zeros(n - n_pos), np.ones(n_pos)].astype(np.int64))
    params = _draw_params(rng, labels)
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        img = _render(params, sl, size, rng)
        out[sl] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return ImageDataset.from_uint8(out, labels, CLASS_NAMES, name)


def make_synthetic(n_train: int = 1200, n_val: int = 300, n_test: int = 300, size: int = 28,
                   seed: int = 0) -> DataBundle:
    """A deterministic synthetic chest-X-ray-like bundle (same seed -> identical bytes).

    Each split has its own random stream, so e.g. the train images do not change when
    ``n_test`` does. ``n_val`` or ``n_test`` of 0 leaves that split out.
    """
    if n_train < 2 or n_val < 0 or n_test < 0:
        raise ConfigError(f"Synthetic data needs n_train >= 2 and n_val, n_test >= 0, got "
                          f"{n_train}, {n_val}, {n_test}.")
    if seed < 0:
        raise ConfigError(f"The random seed must be a non-negative integer, got {seed}.")
    if size < 8:
        raise ConfigError(f"Synthetic images must be at least 8 pixels wide, got {size}.")
    train_ss, val_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    train = _make_split(train_ss, n_train, size, "synthetic/train")
    val = _make_split(val_ss, n_val, size, "synthetic/val") if n_val else None
    test = _make_split(test_ss, n_test, size, "synthetic/test") if n_test else None
    return DataBundle(train, val, test, source="synthetic",
                      info={"format": "synthetic", "seed": seed, "size": size})
