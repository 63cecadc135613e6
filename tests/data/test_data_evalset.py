"""External test sets: a folder or file without splits is all test; ``data split``'s
held-out file stores its images as a test split, and old files still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privmed.data import DataBundle, load_data, make_synthetic, save_npz
from privmed.data.evalset import load_eval_split
from privmed.data.medmnist import read_npz_splits, save_split_npz
from privmed.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(n_train=60, n_val=20, n_test=30, seed=2)


def _folder(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)  # test pixels
    for cls in ("normal", "opacity"):
        for i in range(n):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    return root


def test_a_folder_without_splits_is_all_test(tmp_path):
    root = _folder(tmp_path / "hospital-b")
    images, how = load_eval_split(root, "test")  # today: "has no 'test' split"
    assert len(images) == 8 and how == "all of it: it has no splits"
    # training on the same folder would hold 10 % out for validation; evaluation keeps all
    assert len(load_data(root).train) == 7


def test_held_out_file_is_a_test_split_and_refused_for_training(tmp_path, synth):
    path = save_split_npz(synth.test, tmp_path / "test.npz", "test")
    with np.load(path) as npz:
        assert sorted(npz.files) == ["class_names", "test_images", "test_labels"]
    images, how = load_eval_split(path)
    assert len(images) == 30 and images.dataset_id == synth.test.dataset_id
    assert how == "all of it"
    with pytest.raises(DataError, match="holds only the 'test' split, no training images"):
        load_data(path)
    assert list(read_npz_splits(path)) == ["test"]


def test_old_held_out_files_with_train_keys_still_read(tmp_path, synth):
    old = save_npz(DataBundle(train=synth.test, source="old"), tmp_path / "old.npz")
    images, how = load_eval_split(old, "test")
    assert images.dataset_id == synth.test.dataset_id and how.startswith("all of it")


def test_a_source_with_splits_gives_the_one_asked_for(tmp_path, synth):
    full = save_npz(synth, tmp_path / "full.npz")
    images, how = load_eval_split(full, "val")
    assert len(images) == 20 and how == "its 'val' split"
    site = save_npz(DataBundle(synth.train, synth.val), tmp_path / "site.npz")
    with pytest.raises(ConfigError, match="no 'test' split; choose one of train, val"):
        load_eval_split(site, "test")
    images, _ = load_eval_split("synthetic", "test")
    assert len(images) > 0
