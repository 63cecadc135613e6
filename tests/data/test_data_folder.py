"""PriMIA-style image folders read with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privmed.data import load_image_folder
from privmed.errors import DataError


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _grey(seed: int, h: int = 10, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _colour(seed: int, h: int = 10, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _flat(root: Path, classes=("pneumonia", "normal"), n: int = 3) -> Path:
    for c, cls in enumerate(classes):
        for i in range(n):
            _png(root / cls / f"img{i}.png", _grey(10 * c + i))
    return root


def test_flat_layout_is_train_with_sorted_classes(tmp_path: Path) -> None:
    bundle = load_image_folder(_flat(tmp_path / "data"))
    assert bundle.class_names == ("normal", "pneumonia")
    assert bundle.val is None and bundle.test is None
    assert len(bundle.train) == 6 and bundle.train.image_shape == (1, 10, 10)
    assert bundle.train.class_counts() == [3, 3]
    # pixels are exact: first 'normal' image is seed 10 + 0
    np.testing.assert_array_equal(bundle.train.to_uint8()[0], _grey(10))


def test_split_layout_and_jpeg(tmp_path: Path) -> None:
    root = tmp_path / "primia"
    for split, n in [("train", 3), ("val", 1), ("test", 2)]:
        for cls in ("normal", "pneumonia"):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", _grey(i))
    Image.fromarray(_grey(7)).save(root / "test" / "normal" / "extra.JPEG")
    (root / "train" / "normal" / "notes.txt").write_text("ignored")
    bundle = load_image_folder(root)
    assert [len(s) for s in bundle.splits().values()] == [6, 2, 5]
    assert bundle.test.class_counts() == [3, 2]


def test_resize_and_size_mismatch(tmp_path: Path) -> None:
    root = _flat(tmp_path / "d")
    _png(root / "normal" / "odd.png", _grey(99, 16, 12))
    with pytest.raises(DataError, match=r"odd\.png.*12x16.*--size"):
        load_image_folder(root)
    bundle = load_image_folder(root, size=8)
    assert bundle.train.image_shape == (1, 8, 8) and len(bundle.train) == 7


def test_colour_and_mixed(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _png(root / "a" / "0.png", _colour(0))
    _png(root / "b" / "0.png", _colour(1))
    bundle = load_image_folder(root)
    assert bundle.train.image_shape == (3, 10, 10)
    np.testing.assert_array_equal(bundle.train.to_uint8()[0], _colour(0))
    _png(root / "b" / "grey.png", _grey(2))
    mixed = load_image_folder(root)
    assert mixed.train.image_shape == (3, 10, 10)
    grey = mixed.train.to_uint8()[2]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == _grey(2)).all()


def test_grey_stored_as_rgb_and_16_bit_stay_one_channel(tmp_path: Path) -> None:
    root = tmp_path / "g"
    _png(root / "a" / "rgb.png", np.repeat(_grey(0)[..., None], 3, axis=2))
    sixteen = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
    Image.fromarray(sixteen).save(root / "a" / "deep.png")  # mode I;16
    _png(root / "b" / "0.png", _grey(1))
    bundle = load_image_folder(root)
    assert bundle.train.image_shape == (1, 10, 10)
    deep = bundle.train.to_uint8()[0]  # 'deep.png' sorts first
    np.testing.assert_array_equal(deep, np.round(sixteen / 65535 * 255).astype(np.uint8))


def test_truncated_and_corrupt_png_name_the_file(tmp_path: Path) -> None:
    root = _flat(tmp_path / "t")
    big = np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _png(tmp_path / "full.png", big).read_bytes()
    (root / "normal" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_image_folder(root, size=10)
    (root / "normal" / "cut.png").write_bytes(b"\x89PNG not really an image")
    with pytest.raises(DataError, match=r"cut\.png"):
        load_image_folder(root, size=10)


def test_empty_class_folder_named(tmp_path: Path) -> None:
    root = _flat(tmp_path / "e")
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"zebra.*no PNG/JPEG"):
        load_image_folder(root)


def test_class_mismatch_between_splits(tmp_path: Path) -> None:
    root = tmp_path / "m"
    _flat(root / "train")
    _flat(root / "val", classes=("normal", "covid"))
    with pytest.raises(DataError, match=r"'val'.*same class"):
        load_image_folder(root)


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "empty")
    only_val = _flat(tmp_path / "v" / "val").parent
    with pytest.raises(DataError, match="no 'train'"):
        load_image_folder(only_val)
    one = tmp_path / "one"
    _png(one / "normal" / "0.png", _grey(0))
    with pytest.raises(DataError, match="two classes"):
        load_image_folder(one)
