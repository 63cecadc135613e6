"""Image folders in PriMIA's layout: ``root/<class>/*.png`` or ``root/{train,val,test}/<class>/``;
images may sit in ``<class>/patient-<id>/`` folders, which name each image's patient.

Grey images stay one channel, colour images get three; when a folder mixes both, grey
images are repeated to RGB. An RGB file whose three channels are (nearly) equal counts as
grey, because X-ray collections often store grey images as RGB.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from privmed.data._common import IMAGE_SUFFIXES, build_bundle, discover_layout, folder_patients
from privmed.data.dataset import DataBundle
from privmed.errors import ConfigError, DataError

_GREY_TOLERANCE = 2  # JPEG chroma noise in grey-as-RGB files stays within a couple of levels


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> uint8 ``H x W`` (grey) or ``H x W x 3`` (colour)."""
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        # 16-bit PNGs use the full 0..65535 range; float/int images may use 0..1 or 0..255.
        scale = 1.0 if hi <= 1.0 else 255.0 if hi <= 255.0 else 65535.0
        return np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(img.convert("L"))
    rgb = np.asarray(img.convert("RGB"))
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    if int(spread.max()) <= _GREY_TOLERANCE:
        return np.asarray(img.convert("L"))
    return rgb


def read_image(path: Path) -> np.ndarray:
    """Decode one image file fully, turning any decoder failure into a DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # force a full decode so truncated files fail here
                return _to_uint8(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"Image {path} cannot be read (corrupt or truncated?): "
                        f"{str(exc).rstrip('.')}.") from exc


def load_image_folder(path: str | Path, size: int | None = None) -> DataBundle:
    """Load ``root/<class>/*`` (all train) or ``root/{train,val,test}/<class>/*``.

    Class names are the folder names, sorted alphabetically; ``size`` resizes every image
    to ``size x size`` (required when image sizes differ). With ``<class>/patient-<id>/``
    folders (for every image or none) each image's patient is ``<id>``.
    """
    if size is not None and size < 1:
        raise ConfigError(f"Image size must be a positive number of pixels, got {size}.")
    root = Path(path).expanduser()
    layout = discover_layout(root, is_image_file, "PNG/JPEG images")
    patients = folder_patients(root, layout)
    info = {"format": "image-folder", "splits": list(layout)}
    if patients is not None:
        info["patients_from"] = "folders"
    return build_bundle(layout, read_image, size, str(root), info,
                        None if patients is None else patients.__getitem__)
