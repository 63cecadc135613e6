"""Synthetic chest-X-ray-like data: determinism, shape, balance and non-triviality."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from privmed.data import load_medmnist_npz, make_synthetic, save_npz
from privmed.errors import ConfigError


def test_shape_classes_and_imbalance() -> None:
    bundle = make_synthetic(n_train=200, n_val=50, n_test=40, size=28)
    assert bundle.class_names == ("normal", "opacity")
    assert [len(s) for s in bundle.splits().values()] == [200, 50, 40]
    assert bundle.train.image_shape == (1, 28, 28)
    assert bundle.train.class_counts() == [80, 120]  # 40 / 60
    images = bundle.train.images
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.05  # not blank


def test_deterministic_and_seed_dependent() -> None:
    a = make_synthetic(n_train=100, n_val=20, n_test=20, seed=3)
    b = make_synthetic(n_train=100, n_val=20, n_test=20, seed=3)
    c = make_synthetic(n_train=100, n_val=20, n_test=20, seed=4)
    for split in ("train", "val", "test"):
        assert getattr(a, split).to_uint8().tobytes() == getattr(b, split).to_uint8().tobytes()
        assert getattr(a, split).dataset_id == getattr(b, split).dataset_id
        assert getattr(a, split).dataset_id != getattr(c, split).dataset_id
    # each split has its own stream: the train split does not depend on the test size
    assert make_synthetic(100, 20, 0, seed=3).train.dataset_id == a.train.dataset_id
    assert make_synthetic(100, 20, 0, seed=3).test is None


def test_fast() -> None:
    best = float("inf")
    for _ in range(2):  # best of two: the CI machine is shared
        start = time.perf_counter()
        make_synthetic(n_train=1200, n_val=300, n_test=300)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0


def test_round_trips_exactly_through_npz(tmp_path: Path) -> None:
    bundle = make_synthetic(n_train=60, n_val=20, n_test=20, size=20)
    back = load_medmnist_npz(save_npz(bundle, tmp_path / "syn.npz"))
    assert back.class_names == bundle.class_names
    for split, ds in bundle.splits().items():
        assert back.splits()[split].dataset_id == ds.dataset_id
        assert np.array_equal(back.splits()[split].images.numpy(), ds.images.numpy())


def test_learnable_but_not_trivial_for_a_linear_model() -> None:
    bundle = make_synthetic()
    x_tr = bundle.train.images.reshape(len(bundle.train), -1).numpy()
    x_te = bundle.test.images.reshape(len(bundle.test), -1).numpy()
    # liblinear: single-threaded and quick on a shared CPU
    clf = LogisticRegression(solver="liblinear", max_iter=500)
    clf.fit(x_tr, bundle.train.labels.numpy())
    auc = roc_auc_score(bundle.test.labels.numpy(), clf.predict_proba(x_te)[:, 1])
    assert 0.6 < auc < 0.95, auc


def test_other_sizes_and_bad_arguments() -> None:
    assert make_synthetic(20, 0, 0, size=64).train.image_shape == (1, 64, 64)
    with pytest.raises(ConfigError):
        make_synthetic(size=4)
    with pytest.raises(ConfigError):
        make_synthetic(n_train=1)
    with pytest.raises(ConfigError):
        make_synthetic(seed=-1)
