"""Deterministic synthetic "chest X-ray" images for demos, tests and benchmarks.

Each image has a torso ellipse, two dark lung fields with rib shadows, a heart shadow,
varying anatomy, brightness, contrast and noise. Class ``opacity`` adds one to three soft,
diffuse bright patches of random position, size and intensity inside the lungs; some are
faint, so the task is learnable but not trivially separable from raw pixels.

With ``images_per_patient`` the images come from patients: each patient (1-5 images,
say) has one anatomy, one label and one set of lesions, and their images differ only by
a small shift, exposure and lesion change and their own noise, like follow-up films.
"""

from __future__ import annotations

import numpy as np

from privmed.data.dataset import DataBundle, ImageDataset
from privmed.data.patients import patient_sizes
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
    out = _render_all(params, n, size, rng)
    return ImageDataset.from_uint8(out, labels, CLASS_NAMES, name)


def _render_all(params: dict[str, np.ndarray], n: int, size: int, rng: np.random.Generator
                ) -> np.ndarray:
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        img = _render(params, sl, size, rng)
        out[sl] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return out


def _make_patient_split(seed_seq: np.random.SeedSequence, n: int, size: int, name: str,
                        per_patient: tuple[int, int], id_prefix: str) -> ImageDataset:
    """``n`` images of patients with ``per_patient`` (low, high) images each, in random
    order; a patient's images share anatomy, label and lesions (small changes only)."""
    rng = np.random.default_rng(seed_seq)
    sizes = patient_sizes(n, rng, *per_patient)
    m = len(sizes)
    # Whole patients are positive until about POSITIVE_FRACTION of the images are.
    order = rng.permutation(m)
    positive = order[np.cumsum(sizes[order]) <= round(POSITIVE_FRACTION * n)]
    patient_labels = np.zeros(m, dtype=np.int64)
    patient_labels[positive] = 1
    base = _draw_params(rng, patient_labels)
    owner = rng.permutation(np.repeat(np.arange(m), sizes))
    params = {key: value[owner] for key, value in base.items()}

    def jitter(lo: float, hi: float, shape: tuple[int, ...] = ()) -> np.ndarray:
        return rng.uniform(lo, hi, (n, *shape)).astype(np.float32)

    # Same person, another film: slightly moved, exposed and progressed.
    params["cx"] = params["cx"] + jitter(-0.015, 0.015)
    params["cy"] = params["cy"] + jitter(-0.015, 0.015)
    params["gain"] = params["gain"] * jitter(0.95, 1.05)
    params["offset"] = params["offset"] + jitter(-0.02, 0.02)
    params["b_amp"] = params["b_amp"] * jitter(0.85, 1.15, (_MAX_BLOBS,))
    out = _render_all(params, n, size, rng)
    width = len(str(m - 1))
    ids = [f"{id_prefix}{i:0{width}d}" for i in owner.tolist()]
    return ImageDataset.from_uint8(out, patient_labels[owner], CLASS_NAMES, name, ids)


def make_synthetic(n_train: int = 1200, n_val: int = 300, n_test: int = 300, size: int = 28,
                   seed: int = 0, images_per_patient: tuple[int, int] | None = None
                   ) -> DataBundle:
    """A deterministic synthetic chest-X-ray-like bundle (same seed -> identical bytes).

    Each split has its own random stream, so e.g. the train images do not change when
    ``n_test`` does. ``n_val`` or ``n_test`` of 0 leaves that split out.
    ``images_per_patient=(low, high)`` draws the images from patients of ``low..high``
    images each (uniform, seeded; ids ``s<seed>-<split>-<n>``, no patient in two splits);
    None (the default) gives independent images, byte-identical to earlier releases.
    """
    if n_train < 2 or n_val < 0 or n_test < 0:
        raise ConfigError(f"Synthetic data needs n_train >= 2 and n_val, n_test >= 0, got "
                          f"{n_train}, {n_val}, {n_test}.")
    if seed < 0:
        raise ConfigError(f"The random seed must be a non-negative integer, got {seed}.")
    if size < 8:
        raise ConfigError(f"Synthetic images must be at least 8 pixels wide, got {size}.")
    if images_per_patient is not None:
        low, high = (int(v) for v in images_per_patient)
        if not 1 <= low <= high:
            raise ConfigError(f"images_per_patient must be (low, high) with 1 <= low <= high, "
                              f"got {tuple(images_per_patient)}.")
        images_per_patient = (low, high)
    streams = dict(zip(("train", "val", "test"), np.random.SeedSequence(seed).spawn(3),
                       strict=True))
    counts = {"train": n_train, "val": n_val, "test": n_test}

    def split(name: str) -> ImageDataset | None:
        if not counts[name]:
            return None
        if images_per_patient is None:
            return _make_split(streams[name], counts[name], size, f"synthetic/{name}")
        return _make_patient_split(streams[name], counts[name], size, f"synthetic/{name}",
                                   images_per_patient, f"s{seed}-{name}-")

    info: dict = {"format": "synthetic", "seed": seed, "size": size}
    if images_per_patient is not None:
        info["images_per_patient"] = list(images_per_patient)
    return DataBundle(split("train"), split("val"), split("test"), source="synthetic",
                      info=info)
