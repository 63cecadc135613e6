"""One image file -> the float ``C x H x W`` array an encrypted model expects.

The clinic side of encrypted inference reads a single PNG, JPEG or DICOM file with the
same decoders the training data went through (:mod:`privmed.data.folder`,
:mod:`privmed.data.dicom`), matches the model's channel count (colour -> grey by the
channel mean, grey -> colour by repetition) and resizes it to the model's input size with
the loaders' bilinear resize. Every failure is a :class:`~privmed.errors.DataError`.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from privmed.data._common import DICOM_SUFFIXES, IMAGE_SUFFIXES, resize_uint8
from privmed.data.dicom import is_dicom_file, read_dicom
from privmed.data.folder import read_image
from privmed.errors import DataError

SUPPORTED = "PNG, JPEG or DICOM"
PREVIEW_MIN_SIDE = 256  # previews are upscaled (nearest neighbour) to at least this size
_DICOM_MAGIC = b"DICM"  # bytes 128..131 of a DICOM Part 10 file


def _check_shape(shape: tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise DataError(f"Model input shape {shape!r} is not C x H x W.") from exc
    if c not in (1, 3) or h < 1 or w < 1:
        raise DataError(f"Model input shape {c}x{h}x{w} is not supported "
                        "(1 or 3 channels and a positive size are needed).")
    return c, h, w


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 ``H x W`` / ``H x W x 3`` to ``h x w`` with the data loaders' resize."""
    if image.shape[:2] == (h, w):
        return image
    if h == w:
        return resize_uint8(image, h)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def uint8_to_model(image: np.ndarray, shape: tuple[int, int, int] | list[int]) -> np.ndarray:
    """uint8 ``H x W`` or ``H x W x 3`` -> float32 ``C x H x W`` in [0, 1] for ``shape``."""
    c, h, w = _check_shape(shape)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or arr.size == 0:
        raise DataError(f"Image of shape {arr.shape} is neither grey (H x W) nor RGB "
                        "(H x W x 3).")
    if arr.ndim == 3 and c == 1:  # colour -> grey: the mean of the three channels
        arr = np.round(arr.astype(np.float64).mean(axis=2)).astype(np.uint8)
    arr = _resize(arr.astype(np.uint8, copy=False), h, w)
    if arr.ndim == 2 and c == 3:  # grey -> colour: the same plane three times
        arr = np.repeat(arr[..., None], 3, axis=2)
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(chw, dtype=np.float32) / np.float32(255.0)


def _read_uint8(path: Path) -> np.ndarray:
    """Decode ``path`` as DICOM or PNG/JPEG; an unknown kind of file is a DataError."""
    if is_dicom_file(path):
        return read_dicom(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image(path)
    raise DataError(f"File {path.name} is not a {SUPPORTED} file (suffix "
                    f"'{path.suffix or 'none'}'; expected .png, .jpg, .jpeg or .dcm).")


def load_image_for_model(path: str | Path, shape: tuple[int, int, int] | list[int]
                         ) -> np.ndarray:
    """Read one PNG/JPEG/DICOM file as float32 ``C x H x W`` in [0, 1] at the model's size."""
    _check_shape(shape)
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"Image file {file} does not exist or is not a file.")
    return uint8_to_model(_read_uint8(file), shape)


def _safe_name(filename: str) -> str:
    """The base name of an uploaded file, reduced to characters safe in a temp path."""
    base = Path(str(filename).replace("\\", "/")).name.strip()
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in base)
    return cleaned.lstrip(".")[-120:] or "upload"


def image_from_bytes(data: bytes, filename: str, shape: tuple[int, int, int] | list[int]
                     ) -> np.ndarray:
    """Decode an uploaded file's bytes (kind from ``filename`` or the DICOM preamble)."""
    _check_shape(shape)
    name = _safe_name(filename)
    shown = Path(str(filename).replace("\\", "/")).name or name
    if not data:
        raise DataError(f"File {shown} is empty.")
    suffix = Path(name).suffix.lower()
    looks_dicom = data[128:132] == _DICOM_MAGIC
    if suffix not in IMAGE_SUFFIXES + DICOM_SUFFIXES and not looks_dicom:
        raise DataError(f"File {shown} is not a {SUPPORTED} file (expected .png, .jpg, "
                        ".jpeg or .dcm).")
    # The decoders work on paths; a private temporary file keeps them the single code path.
    with tempfile.TemporaryDirectory(prefix="privmed-upload-") as tmp:
        file = Path(tmp) / name
        file.write_bytes(data)
        try:
            pixels = read_dicom(file) if looks_dicom or suffix in DICOM_SUFFIXES \
                else read_image(file)
        except DataError as exc:  # name the upload, not the temporary path
            raise DataError(str(exc).replace(str(file), shown)) from exc
    return uint8_to_model(pixels, shape)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float ``C x H x W`` in [0, 1] -> uint8 ``H x W`` (C = 1) or ``H x W x 3``."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise DataError(f"Image of shape {arr.shape} is not C x H x W with 1 or 3 channels.")
    u8 = np.round(np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0).astype(np.uint8)
    return u8[0] if u8.shape[0] == 1 else np.ascontiguousarray(u8.transpose(1, 2, 0))


def preview_png(image: np.ndarray, min_side: int = PREVIEW_MIN_SIDE) -> bytes:
    """PNG bytes of a float ``C x H x W`` image, upscaled by a whole factor for display."""
    pil = Image.fromarray(to_uint8(image))
    factor = max(1, math.ceil(min_side / max(pil.size)))
    if factor > 1:  # nearest neighbour shows the pixels the model actually sees
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
