"""The ``load_data`` front door, validation carving and ``describe``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privmed.data import describe, load_data, make_synthetic, save_npz
from privmed.data.medmnist import cached_medmnist_path
from privmed.errors import ConfigError, DataError

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pneumoniamnist.npz"


def _folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    return root


def test_synthetic_source() -> None:
    bundle = load_data("synthetic", size=16, seed=1)
    assert bundle.source == "synthetic" and bundle.train.image_shape == (1, 16, 16)
    assert bundle.val is not None and bundle.test is not None
    assert bundle.train.dataset_id == load_data("synthetic", size=16, seed=1).train.dataset_id


def test_npz_source_and_resize(tmp_path: Path) -> None:
    path = save_npz(make_synthetic(40, 10, 10, size=20), tmp_path / "s.npz")
    bundle = load_data(path)
    assert bundle.info["format"] == "medmnist-npz" and len(bundle.val) == 10
    small = load_data(str(path), size=10)
    assert all(ds.image_shape == (1, 10, 10) for ds in small.splits().values())
    # resized data is 8-bit exact, so it round-trips through save_npz unchanged
    again = load_data(save_npz(small, tmp_path / "small.npz"))
    assert again.train.dataset_id == small.train.dataset_id


def test_folder_source_carves_stratified_val(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", {"normal": 20, "pneumonia": 40})
    bundle = load_data(root, val_fraction=0.25, seed=3)
    assert bundle.info["format"] == "image-folder"
    assert len(bundle.train) == 45 and len(bundle.val) == 15
    assert bundle.val.class_counts() == [5, 10]  # stratified
    assert bundle.info["val_from_train"] == {"fraction": 0.25, "seed": 3}
    same = load_data(root, val_fraction=0.25, seed=3)
    other = load_data(root, val_fraction=0.25, seed=4)
    assert same.val.dataset_id == bundle.val.dataset_id != other.val.dataset_id
    assert load_data(root, val_fraction=0.0).val is None


def test_bare_dataset_name_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVMED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="privmed data fetch pneumoniamnist"):
        load_data("pneumoniamnist")
    with pytest.raises(ConfigError, match="--size 64"):
        load_data("pneumoniamnist", size=64)
    cached = cached_medmnist_path("pneumoniamnist")
    assert cached.is_relative_to(tmp_path / "cache")
    save_npz(make_synthetic(30, 10, 10), cached)
    bundle = load_data("pneumoniamnist")
    assert len(bundle.train) == 30 and bundle.source == str(cached)
    assert load_data("pneumoniamnist", size=32).train.image_shape == (1, 32, 32)


def test_bad_sources_and_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing-here"):
        load_data(tmp_path / "nothing-here")
    with pytest.raises(DataError, match="nothing-here"):
        load_data("nothing-here")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes\.txt.*not a \.npz"):
        load_data(tmp_path / "notes.txt")
    npz = save_npz(make_synthetic(20, 0, 0, size=8), tmp_path / "x.npz")
    with pytest.raises(ConfigError, match="labels CSV"):
        load_data(npz, labels_csv=tmp_path / "labels.csv")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_data("synthetic", val_fraction=1.0)
    with pytest.raises(ConfigError, match="size"):
        load_data("synthetic", size=0)


def test_describe_rows() -> None:
    bundle = make_synthetic(50, 10, 20, size=8)
    rows = describe(bundle)
    assert [r["split"] for r in rows] == ["train", "val", "test"]
    assert rows[0]["n"] == 50 and rows[0]["shape"] == (1, 8, 8)
    assert rows[0]["counts"] == {"normal": 20, "opacity": 30}
    assert rows[2]["dataset_id"] == bundle.test.dataset_id


def test_real_pneumoniamnist_via_front_door() -> None:
    if not REAL.is_file():
        pytest.skip(f"shared PneumoniaMNIST file not found at {REAL.resolve()}")
    rows = {r["split"]: r for r in describe(load_data(REAL))}
    assert {k: r["n"] for k, r in rows.items()} == {"train": 4708, "val": 524, "test": 624}
    assert rows["train"]["shape"] == (1, 28, 28)
    assert rows["val"]["counts"] == {"normal": 135, "pneumonia": 389}
