"""``privmed encrypted compile``: check a trained model can run on CKKS ciphertexts,
choose the CKKS parameters, check value ranges, and write a servable artefact.

The artefact (``.he``) is an ``.npz`` of the folded weights plus a JSON model card; it
loads without pickle. The card keeps the CKKS limit of every stage, never the maxima the
calibration images reached (``calibration.py`` says where those images come from).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from privmed.encrypted.calibration import PRIVATE, SYNTHETIC
from privmed.encrypted.ckks import CKKSParams, choose_params
from privmed.encrypted.layout import Geometry, SingleLayout, im2col_indices
from privmed.errors import ConfigError, DataError
from privmed.fileio import write_private_bytes
from privmed.models.he import Square
from privmed.models.layers import Standardize

ARTEFACT_FORMAT = "privmed.he/1"
RANGE_MARGIN = 4.0  # calibration maxima x this must fit: unseen images may go further
MAX_OUTPUT_SCALE = 2.0 ** 10  # beyond this the scaled-down logits lose too much precision


@dataclass
class HEModel:
    """Folded weights (``Standardize`` merged into the convolution) and the model card."""

    geometry: Geometry
    params: CKKSParams
    conv_w: np.ndarray  # [conv_channels, kernel_size]
    conv_b: np.ndarray
    fc1_w: np.ndarray  # [hidden, conv_channels * windows]
    fc1_b: np.ndarray
    fc2_w: np.ndarray  # [classes, hidden], already divided by output_scale
    fc2_b: np.ndarray
    output_scale: float = 1.0
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> SingleLayout:
        return SingleLayout(self.geometry, self.params.slots)

    def stages(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Plaintext forward pass on ``N x C x H x W``: every intermediate value, plus the
        bound on partial sums (sums of absolute terms) that rotations and additions see."""
        x = images.reshape(images.shape[0], -1).astype(np.float64)
        cols = x[:, im2col_indices(self.geometry)]  # [N, windows, k]
        conv = np.einsum("nwk,ck->ncw", cols, self.conv_w) + self.conv_b[None, :, None]
        conv_abs = np.einsum("nwk,ck->ncw", np.abs(cols), np.abs(self.conv_w)) + np.abs(
            self.conv_b)[None, :, None]
        h1 = (conv ** 2).reshape(x.shape[0], -1)
        fc1 = h1 @ self.fc1_w.T + self.fc1_b
        fc1_abs = h1 @ np.abs(self.fc1_w).T + np.abs(self.fc1_b)
        h2 = fc1 ** 2
        out = h2 @ self.fc2_w.T + self.fc2_b
        out_abs = h2 @ np.abs(self.fc2_w).T + np.abs(self.fc2_b)
        return {"conv": conv_abs, "square1": h1, "hidden": fc1_abs, "square2": h2,
                "output": out_abs, "logits": out * self.output_scale}

    def plain_logits(self, images: np.ndarray) -> np.ndarray:
        return self.stages(images)["logits"]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        card = {**self.card, "format": ARTEFACT_FORMAT, "geometry": self.geometry.to_dict(),
                "ckks": self.params.to_dict(), "output_scale": self.output_scale}
        buf = io.BytesIO()
        np.savez(buf, card=np.frombuffer(json.dumps(card).encode(), dtype=np.uint8),
                 conv_w=self.conv_w, conv_b=self.conv_b, fc1_w=self.fc1_w, fc1_b=self.fc1_b,
                 fc2_w=self.fc2_w, fc2_b=self.fc2_b)
        write_private_bytes(path, buf.getvalue())  # 0600: the model's weights
        self.card = card
        return path

    @classmethod
    def load(cls, path: str | Path) -> HEModel:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"Encrypted-inference model {path} does not exist.")
        try:
            with np.load(path, allow_pickle=False) as z:
                card = json.loads(bytes(z["card"]).decode())
                arrays = {k: np.asarray(z[k], dtype=np.float64) for k in
                          ("conv_w", "conv_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b")}
        except Exception as exc:
            raise DataError(f"{path} is not a compiled privmed model ({type(exc).__name__}); "
                            "make one with 'privmed encrypted compile MODEL.pt'.") from None
        if card.get("format") != ARTEFACT_FORMAT:
            raise DataError(f"{path} is not a compiled privmed model (format "
                            f"{card.get('format')!r}, expected {ARTEFACT_FORMAT}).")
        return cls(Geometry.from_dict(card["geometry"]), CKKSParams.from_dict(card["ckks"]),
                   output_scale=float(card["output_scale"]), card=card, **arrays)


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's leaf layers in forward order (Sequential children, then the head)."""
    return [m for m in model.modules() if not list(m.children())]


_PATTERN = (nn.Conv2d, Square, nn.Flatten, nn.Linear, Square, nn.Linear)
_WHY = {
    nn.Conv2d: "the first layer must be a convolution",
    Square: "activations must be x^2 (only additions and multiplications exist on "
            "ciphertexts; use model he-cnn)",
    nn.Flatten: "a Flatten must follow the first activation",
    nn.Linear: "a linear layer must follow",
}


def extract(model: nn.Module, image_shape: tuple[int, int, int]
            ) -> tuple[Geometry, dict[str, np.ndarray]]:
    """Check the layer pattern and sizes for images of ``image_shape`` and fold
    ``Standardize`` into the convolution."""
    layers = [m for m in _layers(model) if not isinstance(m, nn.Identity | nn.Dropout)]
    std = None
    if layers and isinstance(layers[0], Standardize):
        std = layers.pop(0)
    for i, expected in enumerate(_PATTERN):
        if i >= len(layers):
            raise ConfigError(f"The model ends after {len(layers)} layers; CKKS serving needs "
                              "conv -> x^2 -> flatten -> linear -> x^2 -> linear.")
        if not isinstance(layers[i], expected):
            raise ConfigError(f"Layer {i + 1} ({type(layers[i]).__name__}) cannot be served "
                              f"encrypted: {_WHY[expected]}.")
    if len(layers) > len(_PATTERN):
        extra = layers[len(_PATTERN)]
        raise ConfigError(f"Layer {len(_PATTERN) + 1} ({type(extra).__name__}) cannot be served "
                          "encrypted: the CKKS depth budget ends after the second linear layer.")
    conv, fc1, fc2 = layers[0], layers[3], layers[5]
    kh, kw = conv.kernel_size
    if kh != kw or conv.stride[0] != conv.stride[1] or any(conv.padding) or conv.groups != 1 \
            or any(d != 1 for d in conv.dilation):
        raise ConfigError("Layer 1 (Conv2d) cannot be served encrypted: it needs a square "
                          "kernel, equal strides, no padding, no dilation and no groups.")
    w = conv.weight.detach().double().numpy()
    b = (conv.bias.detach().double().numpy() if conv.bias is not None
         else np.zeros(w.shape[0]))
    if std is not None:  # conv((x - m) / s) = conv(x) with w / s, minus sum(w / s * m)
        c_in = w.shape[1]
        mean = np.broadcast_to(np.asarray(std.mean, dtype=np.float64), (c_in,))
        sd = np.broadcast_to(np.asarray(std.std, dtype=np.float64), (c_in,))
        w = w / sd[None, :, None, None]
        b = b - np.einsum("oihw,i->o", w, mean)
    arrays = {"conv_w": w.reshape(w.shape[0], -1), "conv_b": b}
    for name, lin in (("fc1", fc1), ("fc2", fc2)):
        arrays[f"{name}_w"] = lin.weight.detach().double().numpy()
        arrays[f"{name}_b"] = (lin.bias.detach().double().numpy() if lin.bias is not None
                               else np.zeros(lin.out_features))
    if w.shape[1] != image_shape[0]:
        raise ConfigError(f"The convolution takes {w.shape[1]} channels but the model's images "
                          f"have {image_shape[0]}.")
    geometry = Geometry(w.shape[1], image_shape[1], image_shape[2], kh, conv.stride[0],
                        w.shape[0], fc1.out_features, fc2.out_features)
    if fc1.in_features != geometry.conv_channels * geometry.windows:
        raise ConfigError(f"Layer 4 (Linear) takes {fc1.in_features} inputs but the "
                          f"convolution gives {geometry.conv_channels * geometry.windows}.")
    return geometry, arrays


def level_limits(params: CKKSParams) -> dict[str, float]:
    """Largest |value| each stage may reach before it wraps around: the product before a
    rescale is held at scale^2 under the primes still left at that point."""
    bits = params.coeff_modulus_bits[:-1]  # data primes; the special prime is for keys
    limits, remaining = {}, list(bits)
    for stage in ("conv", "square1", "hidden", "square2", "output"):
        q_bits = sum(remaining)
        limits[stage] = 2.0 ** (q_bits - 2 * params.scale_bits - 1)
        remaining.pop()
    return limits


def validated_performance(info: dict[str, Any]) -> dict[str, Any]:
    """The card's decision rule and tested performance, from the trained model's file:
    ``operating_point`` (positive class, threshold, how it was chosen) and
    ``performance`` (test AUC, sensitivity and specificity at that threshold, with 95 %
    CIs); None where the model was saved before privmed recorded them."""
    meta = info.get("meta") or {}
    op = meta.get("operating_point")
    keep = ("positive_index", "positive_class", "threshold", "method", "target", "chosen_on",
            "n", "within_dp_guarantee")
    return {"operating_point": {k: op.get(k) for k in keep} if op else None,
            "performance": meta.get("performance")}


def compile_model(model: nn.Module, info: dict[str, Any], calibration: np.ndarray, *,
                  source: str) -> tuple[HEModel, dict[str, Any]]:
    """Make a servable :class:`HEModel` from a trained model and calibration images
    (``N x C x H x W`` in [0, 1]) whose provenance ``source`` names for the card
    (``calibration.SYNTHETIC``, ``"public:NAME"`` or ``calibration.PRIVATE``); returns it
    with a report of ranges and limits (the maxima stay in the report, not the card)."""
    if source not in (SYNTHETIC, PRIVATE) and not source.startswith("public:"):
        raise ConfigError(f"Calibration source {source!r} is not 'synthetic', 'public:NAME' "
                          f"or {PRIVATE!r}.")
    shape = tuple(info["image_shape"])
    geometry, arrays = extract(model, shape)
    params = choose_params(depth=5)
    layout = SingleLayout(geometry, params.slots)
    if layout.problems():
        raise ConfigError(f"The model does not fit one ciphertext: {layout.problems()[0]}.")
    privacy = (info.get("meta") or {}).get("privacy") or {}
    card = {"model": info.get("name") or "custom", "input_shape": list(shape),
            "class_names": list(info["class_names"]),
            "epsilon": privacy.get("epsilon") if privacy.get("enabled") else None,
            "delta": privacy.get("delta") if privacy.get("enabled") else None,
            "dataset_id": (info.get("meta") or {}).get("dataset_id"),
            "run_id": (info.get("meta") or {}).get("run_id"), "calibration": source,
            # Aggregate figures on held-out images, released like results.json is.
            **validated_performance(info)}
    he = HEModel(geometry, params, card=card, **arrays)
    images = np.asarray(calibration, dtype=np.float64)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise DataError(f"Calibration images have shape {tuple(images.shape[1:])}, the model "
                        f"takes {shape}.")
    limits = level_limits(params)
    maxima = {s: float(np.abs(v).max()) for s, v in he.stages(images).items() if s in limits}
    for stage in ("conv", "square1", "hidden", "square2"):
        if maxima[stage] * RANGE_MARGIN > limits[stage]:
            raise ConfigError(f"The {stage} layer reaches {maxima[stage]:.3g} on calibration "
                              f"images, beyond what CKKS holds at that level "
                              f"({limits[stage]:.3g}); retrain with smaller weights.")
    need = maxima["output"] * RANGE_MARGIN / limits["output"]
    if need > 1:  # scale the head down by a power of two; the client multiplies back
        he.output_scale = 2.0 ** math.ceil(math.log2(need))
        if he.output_scale > MAX_OUTPUT_SCALE:
            raise ConfigError(f"The output layer reaches {maxima['output']:.3g} on calibration "
                              f"images; scaling it into CKKS's range ({limits['output']:.3g}) "
                              "would lose too much precision.")
        he.fc2_w = he.fc2_w / he.output_scale
        he.fc2_b = he.fc2_b / he.output_scale
        maxima["output"] /= he.output_scale
    report = {"geometry": geometry.to_dict(), "ckks": params.to_dict(),
              "output_scale": he.output_scale, "calibration_images": int(images.shape[0]),
              "ranges": {s: {"max": maxima[s], "limit": limits[s]} for s in limits}}
    # limits only: the maxima are functions of the calibration images
    he.card["ranges"] = {s: {"limit": limits[s]} for s in limits}
    return he, report
