"""DICOM folders: ``*.dcm`` (or extensionless DICOM) files labelled by class folder or CSV.

Pixel pipeline per file, following the DICOM display chain (PS3.3 C.11): first frame only
-> Modality LUT (Rescale Slope/Intercept) -> VOI LUT or Window Center/Width if present,
else min-max -> MONOCHROME1 inversion -> 8 bit -> optional resize.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.pixels.processing import apply_windowing

from privmed.data._common import (
    DICOM_SUFFIXES,
    SPLIT_ALIASES,
    build_bundle,
    discover_layout,
    folder_patients,
)
from privmed.data.dataset import SPLITS, DataBundle, ImageDataset
from privmed.errors import ConfigError, DataError

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Decoders for the many transfer syntaxes raise a variety of exception types.
_DECODE_ERRORS = (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError,
                  TypeError, IndexError, OSError, EOFError)


def is_dicom_file(path: Path) -> bool:
    """``*.dcm`` files, plus any other file that starts with the DICOM preamble."""
    if path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        return is_dicom(path)
    except OSError:
        return False


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return (arr - lo) / (hi - lo)


def _window(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """VOI transform to [0, 1]: the file's VOI LUT / window if any, else min-max."""
    voi_seq = ds.get("VOILUTSequence")
    has_lut = bool(voi_seq) and "LUTDescriptor" in voi_seq[0] and "LUTData" in voi_seq[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return _minmax(arr)
    try:
        if has_lut:  # apply_voi_lut prefers the LUT; it indexes with integers
            out = apply_voi_lut(np.round(arr).astype(np.int64), ds, index=0)
            lo, hi = 0.0, float(2 ** int(voi_seq[0].LUTDescriptor[2]) - 1)
        else:
            out = apply_voi_lut(arr, ds, index=0)
            # The window saturates at its output range; probing far outside finds it.
            lo, hi = apply_windowing(np.array([-1e30, 1e30]), ds, index=0)
    except (ValueError, NotImplementedError, AttributeError, KeyError, TypeError, IndexError):
        return _minmax(arr)  # an unusable window (e.g. width < 1) is ignored, not fatal
    if hi == lo:
        return _minmax(arr)
    return np.clip((np.asarray(out, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(path: Path) -> np.ndarray:
    """One DICOM file -> uint8 ``H x W`` (grey) or ``H x W x 3`` (colour), first frame only."""
    return _image(_dcmread(path), path)


def _dcmread(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError,
            AttributeError) as exc:
        raise DataError(f"DICOM file {path} cannot be read (not DICOM, corrupt or "
                        f"truncated?).") from exc


def _image(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DataError(f"DICOM file {path} has no pixel data (not an image, or truncated).")
    try:
        frame = np.asarray(pixel_array(ds, index=0))
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            if frame.ndim != 2:
                raise ValueError(f"grey frame has shape {frame.shape}")
            norm = _window(np.asarray(apply_modality_lut(frame, ds), dtype=np.float64), ds)
            if photometric == "MONOCHROME1":  # MONOCHROME1 shows low values as white
                norm = 1.0 - norm
            return np.round(norm * 255.0).astype(np.uint8)
        if photometric == "PALETTE COLOR":
            frame = apply_color_lut(frame, ds)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"colour frame has shape {frame.shape}")
        if frame.dtype == np.uint8:
            return frame
        bits = 16 if photometric == "PALETTE COLOR" else int(ds.get("BitsStored", 8))
        scaled = frame.astype(np.float64) / (2**bits - 1) * 255.0
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    except _DECODE_ERRORS as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        how = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise DataError(f"DICOM file {path} has pixel data that cannot be decoded{how}: "
                        f"{str(exc).rstrip('.')}.") from exc


def _layout_from_csv(root: Path, csv_path: Path
                     ) -> tuple[dict[str, dict[str, list[Path]]], dict[Path, str] | None]:
    """Rows ``file,label[,split][,patient]`` (file relative to ``root``) ->
    ``split -> class -> files``, and each file's patient when the CSV has that column."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"Label file {csv_path} cannot be read as CSV.") from exc
    if not rows:
        raise DataError(f"Label file {csv_path} is empty.")
    header = [h.strip().lower() for h in rows[0]]
    if "file" not in header or "label" not in header:
        raise DataError(f"Label file {csv_path} needs the columns 'file' and 'label' "
                        f"(found {rows[0]}).")
    fi, li = header.index("file"), header.index("label")
    si = header.index("split") if "split" in header else None
    pi = next((header.index(h) for h in ("patient", "patient_id") if h in header), None)
    patients: dict[Path, str] = {}
    entries: list[tuple[str, str, Path]] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = [c.strip() for c in row] + [""] * len(header)
        name, label = cells[fi], cells[li]
        if not name or not label:
            raise DataError(f"Label file {csv_path} line {lineno} has an empty file or label.")
        raw_split = cells[si] if si is not None else ""
        split = SPLIT_ALIASES.get(raw_split.lower()) if raw_split else "train"
        if split is None:
            raise DataError(f"Label file {csv_path} line {lineno} has unknown split "
                            f"'{raw_split}' (use train, val or test).")
        file = Path(name) if Path(name).is_absolute() else root / name
        if not file.is_file():
            raise DataError(f"DICOM file {file} listed in {csv_path} line {lineno} "
                            "does not exist.")
        entries.append((split, label, file))
        if pi is not None:
            patients[file] = cells[pi]
    if not entries:
        raise DataError(f"Label file {csv_path} lists no files.")
    if not any(split == "train" for split, _, _ in entries):
        raise DataError(f"Label file {csv_path} assigns no files to the train split.")
    classes = sorted({label for _, label, _ in entries})
    layout: dict[str, dict[str, list[Path]]] = {}
    for split in SPLITS:
        chosen = [(label, f) for s, label, f in entries if s == split]
        if chosen:
            layout[split] = {c: [f for label, f in chosen if label == c] for c in classes}
    return layout, patients if pi is not None else None


def load_dicom(path: str | Path, size: int | None = None,
               labels_csv: str | Path | None = None) -> DataBundle:
    """Load a folder of DICOM files labelled by class sub-folders or by ``labels_csv``.

    Without a CSV the layout is ``root/<class>/*`` or ``root/{train,val,test}/<class>/*``.
    The CSV has columns ``file,label`` (and optionally ``split`` and ``patient``), ``file``
    relative to ``root``. Class names are sorted alphabetically. Each image's patient is
    the CSV's ``patient`` column, or in class folders its ``<class>/patient-<id>/``
    folder, else the file's Patient ID (0010,0020); files without
    one are kept together as one unnamed patient, so they never straddle two splits.
    """
    if size is not None and size < 1:
        raise ConfigError(f"Image size must be a positive number of pixels, got {size}.")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"DICOM folder {root} does not exist or is not a folder.")
    if labels_csv is not None:
        csv_path = Path(labels_csv).expanduser()
        if not csv_path.is_file() and (root / csv_path).is_file():
            csv_path = root / csv_path
        if not csv_path.is_file():
            raise DataError(f"Label file {csv_path} does not exist.")
        layout, listed = _layout_from_csv(root, csv_path)
        info = {"format": "dicom", "labels_csv": str(csv_path)}
    else:
        layout = discover_layout(root, is_dicom_file, "DICOM files")
        listed = folder_patients(root, layout)  # patient-<id>/ folders win over the header
        info = {"format": "dicom"}
        if listed is not None:
            info["patients_from"] = "folders"
    headers: dict[Path, str] = {}

    def read(file: Path) -> np.ndarray:
        ds = _dcmread(file)
        headers[file] = str(ds.get("PatientID", "") or "").strip()
        return _image(ds, file)

    def patient_of(file: Path) -> str:
        header = headers.pop(file)  # popped either way: one entry per file would pile up
        return listed[file] if listed is not None else header

    bundle = build_bundle(layout, read, size, str(root), {**info, "splits": list(layout)},
                          patient_of)
    ids = bundle.train.patient_ids or ()
    if not any(ids):  # no file names its patient: patients unknown, not one big patient
        parts = {k: ImageDataset(v.images, v.labels, v.class_names, v.name)
                 for k, v in bundle.splits().items()}
        bundle = DataBundle(parts["train"], parts.get("val"), parts.get("test"),
                            bundle.source, bundle.info)
    return bundle
