"""DICOM folders: pixel pipeline (modality LUT, window, MONOCHROME1, frames) and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_folder import new_dataset

from privmed.data import load_data, load_dicom
from privmed.data.dicom import read_dicom
from privmed.errors import DataError


def _dicom(path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
           slope: float | None = None, intercept: float | None = None,
           window: tuple[float, float] | None = None) -> Path:
    """Write a minimal valid DICOM file (Explicit VR Little Endian) with 16-bit grey pixels,
    or 8-bit RGB when ``pixels`` is ``H x W x 3`` uint8; frames when ``pixels`` is 3-D grey."""
    ds = new_dataset("TEST")
    if pixels is not None:
        rgb = pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        ds.SamplesPerPixel = 3 if rgb else 1
        ds.PhotometricInterpretation = "RGB" if rgb else photometric
        if rgb:
            ds.PlanarConfiguration = 0
        elif pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
        ds.Rows, ds.Columns = pixels.shape[-2:] if not rgb else pixels.shape[:2]
        ds.BitsAllocated = ds.BitsStored = 8 if rgb else 16
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype == np.int16)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(h: int = 4, w: int = 5, hi: int = 4095) -> np.ndarray:
    return np.linspace(0, hi, h * w).round().astype(np.uint16).reshape(h, w)


def test_monochrome2_min_max(tmp_path: Path) -> None:
    ramp = _ramp()
    out = read_dicom(_dicom(tmp_path / "a.dcm", ramp))
    expected = np.round(ramp / ramp.max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_window_after_rescale_and_monochrome1(tmp_path: Path) -> None:
    # stored [0, 400, 500, 600, 1000] * 2 - 1000 = HU-like [-1000, -200, 0, 200, 1000]
    stored = np.array([[0, 400, 500, 600, 1000]], dtype=np.uint16)
    kwargs = {"slope": 2.0, "intercept": -1000.0, "window": (0.0, 400.0)}
    mono2 = read_dicom(_dicom(tmp_path / "m2.dcm", stored, **kwargs))
    np.testing.assert_array_equal(mono2, [[0, 0, 128, 255, 255]])
    mono1 = read_dicom(_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1",
                              **kwargs))
    np.testing.assert_array_equal(mono1, [[255, 255, 127, 0, 0]])
    # min-max (no window) ignores an affine rescale but MONOCHROME1 still inverts
    plain = read_dicom(_dicom(tmp_path / "p1.dcm", stored, photometric="MONOCHROME1",
                              slope=2.0, intercept=-1000.0))
    np.testing.assert_array_equal(plain, [[255, 153, 128, 102, 0]])


def test_signed_pixels(tmp_path: Path) -> None:
    stored = np.array([[-1000, 0, 1000]], dtype=np.int16)
    np.testing.assert_array_equal(read_dicom(_dicom(tmp_path / "s.dcm", stored)),
                                  [[0, 128, 255]])


def test_first_frame_of_multiframe(tmp_path: Path) -> None:
    frames = np.stack([_ramp(), _ramp()[::-1], np.zeros((4, 5), np.uint16)])
    out = read_dicom(_dicom(tmp_path / "mf.dcm", frames))
    np.testing.assert_array_equal(out, read_dicom(_dicom(tmp_path / "f0.dcm", _ramp())))


def test_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_dicom(_dicom(tmp_path / "rgb.dcm", rgb)), rgb)


def test_class_folders_extensionless_and_resize(tmp_path: Path) -> None:
    root = tmp_path / "dcm"
    for i in range(2):
        _dicom(root / "normal" / f"IM{i:04d}", _ramp(hi=1000 + i))  # extensionless DICOM
        _dicom(root / "pneumonia" / f"{i}.dcm", _ramp()[::-1].copy())
    (root / "normal" / "README").write_text("not dicom")
    bundle = load_dicom(root)
    assert bundle.class_names == ("normal", "pneumonia")
    assert bundle.train.class_counts() == [2, 2] and bundle.train.image_shape == (1, 4, 5)
    _dicom(root / "normal" / "big.dcm", _ramp(8, 8))
    with pytest.raises(DataError, match=r"big\.dcm.*--size"):
        load_dicom(root)
    assert load_dicom(root, size=6).train.image_shape == (1, 6, 6)
    via_front_door = load_data(root, size=6, val_fraction=0.0)
    assert via_front_door.info["format"] == "dicom" and len(via_front_door.train) == 5


def test_labels_csv(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i in range(4):
        _dicom(root / "scans" / f"{i}.dcm", _ramp(hi=500 + i))
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,split\nscans/0.dcm,pneumonia,train\nscans/1.dcm,normal,\n"
                   "scans/2.dcm,pneumonia,train\nscans/3.dcm,normal,test\n")
    bundle = load_dicom(root, labels_csv=csv)
    assert bundle.class_names == ("normal", "pneumonia")
    assert bundle.train.labels.tolist() == [0, 1, 1] and bundle.test.labels.tolist() == [0]
    csv.write_text("file,label\nscans/0.dcm,a\nscans/9.dcm,b\n")
    with pytest.raises(DataError, match=r"9\.dcm.*labels\.csv line 3"):
        load_dicom(root, labels_csv=csv)
    csv.write_text("path,class\nscans/0.dcm,a\n")
    with pytest.raises(DataError, match=r"labels\.csv.*'file' and 'label'"):
        load_dicom(root, labels_csv=csv)
    with pytest.raises(DataError, match="nothere.csv"):
        load_dicom(root, labels_csv=tmp_path / "nothere.csv")


def test_no_pixel_data_and_garbage_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nopix\.dcm has no pixel data"):
        read_dicom(_dicom(tmp_path / "nopix.dcm", None))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"definitely not a dicom file" * 20)
    with pytest.raises(DataError, match=r"junk\.dcm"):
        read_dicom(junk)
    good = _dicom(tmp_path / "good.dcm", _ramp(32, 32)).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good[: len(good) - 1000])  # pixel data shorter than Rows x Columns
    with pytest.raises(DataError, match=r"cut\.dcm"):
        read_dicom(cut)
    root = tmp_path / "tree"
    _dicom(root / "a" / "0.dcm", _ramp())
    _dicom(root / "b" / "0.dcm", None)
    with pytest.raises(DataError, match=r"0\.dcm has no pixel data"):
        load_dicom(root)
