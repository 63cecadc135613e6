"""Patient ids from every source: ``<split>_patients`` in an npz, ``patient-<id>/`` folders
(PNG and DICOM), synthetic patients and generated ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dicom_folder import write_dicom
from PIL import Image

from privmed.data import (
    DataBundle,
    ImageDataset,
    assign_patients,
    load_data,
    load_image_folder,
    load_medmnist_npz,
    make_synthetic,
    save_npz,
)
from privmed.data.medmnist import read_npz_splits, save_split_npz
from privmed.data.patients import describe_patients, patient_summary, with_generated_patients
from privmed.errors import DataError


def _images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text.endswith(".") and "\n" not in text
    return text


# --------------------------------------------------------------------------- npz


def test_npz_round_trip_keeps_patients_of_every_split(tmp_path: Path):
    ids = {"train": ["p1", "p1", "p2", "p3", "p3", "p3"], "val": ["p4", "p4"],
           "test": ["p5", "p6", "p6"]}
    parts = {s: ImageDataset.from_uint8(_images(len(v), i), [0, 1] * (len(v) // 2) + [0] *
                                        (len(v) % 2), ("a", "b"), f"t/{s}", v)
             for i, (s, v) in enumerate(ids.items())}
    path = save_npz(DataBundle(parts["train"], parts["val"], parts["test"], "t"),
                    tmp_path / "p.npz")
    with np.load(path) as raw:
        assert raw["train_patients"].dtype.kind == "U"  # readable without pickle
    back = load_medmnist_npz(path)
    for split, ds in back.splits().items():
        assert ds.patient_ids == tuple(ids[split])
        np.testing.assert_array_equal(ds.to_uint8(), parts[split].to_uint8())
    alone = save_split_npz(back.test, tmp_path / "test.npz")
    assert read_npz_splits(alone)["test"].patient_ids == tuple(ids["test"])
    # without patients nothing is written, and nothing is made up on loading
    plain = save_npz(DataBundle(ImageDataset.from_uint8(_images(4), [0, 1, 0, 1], ("a", "b"))),
                     tmp_path / "plain.npz")
    with np.load(plain) as raw:
        assert "train_patients" not in raw.files
    assert load_medmnist_npz(plain).train.patient_ids is None


def test_npz_integer_patients_and_bad_patient_arrays(tmp_path: Path):
    labels = np.array([[0], [1], [0], [1]], dtype=np.uint8)
    good = tmp_path / "int.npz"
    np.savez(good, train_images=_images(4), train_labels=labels,
             train_patients=np.array([[17], [17], [3], [40]]))
    assert load_medmnist_npz(good).train.patient_ids == ("17", "17", "3", "40")
    short = tmp_path / "short.npz"
    np.savez(short, train_images=_images(4), train_labels=labels,
             train_patients=np.array(["a", "b", "c"]))
    with pytest.raises(DataError) as exc:
        load_medmnist_npz(short)
    assert "4 images but 3 patient ids in 'train_patients'" in _one_sentence(exc)
    floats = tmp_path / "float.npz"
    np.savez(floats, train_images=_images(4), train_labels=labels,
             train_patients=np.array([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(DataError, match="strings or integers"):
        load_medmnist_npz(floats)
    orphan = tmp_path / "orphan.npz"
    np.savez(orphan, train_images=_images(4), train_labels=labels,
             val_patients=np.array(["a"]))
    with pytest.raises(DataError, match="'val_patients' but no 'val_images'"):
        load_medmnist_npz(orphan)


# --------------------------------------------------------------------------- folders


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_images(1, seed)[0]).save(path)


def test_patient_folders_name_the_patients(tmp_path: Path):
    root = tmp_path / "xrays"
    for cls, patients in (("normal", {"3": 2, "8": 1}), ("pneumonia", {"17": 3})):
        for pid, count in patients.items():
            for j in range(count):
                _png(root / cls / f"patient-{pid}" / f"img{j}.png", int(pid) * 10 + j)
    (root / "normal" / "notes").mkdir()  # other sub-folders stay ignored
    bundle = load_image_folder(root)
    assert bundle.train.patient_ids == ("3", "3", "8", "17", "17", "17")
    assert bundle.train.class_counts() == [3, 3]
    assert bundle.info["patients_from"] == "folders"
    # the same layout under split folders
    split_root = tmp_path / "split"
    for split, pid in (("train", "1"), ("train", "2"), ("test", "9")):
        for cls in ("normal", "pneumonia"):
            _png(split_root / split / cls / f"patient-{pid}" / "a.png", int(pid))
    split_bundle = load_image_folder(split_root)
    assert split_bundle.train.patient_ids == ("1", "2", "1", "2")
    assert split_bundle.test.patient_ids == ("9", "9")


def test_mixed_patient_folder_layouts_are_refused(tmp_path: Path):
    root = tmp_path / "mixed"
    _png(root / "normal" / "patient-1" / "a.png", 1)
    _png(root / "pneumonia" / "loose.png", 2)
    with pytest.raises(DataError) as exc:
        load_image_folder(root)
    text = _one_sentence(exc)
    assert "patient-1" in text and "loose.png" in text
    unnamed = tmp_path / "unnamed"
    _png(unnamed / "normal" / "patient-" / "a.png", 1)
    _png(unnamed / "pneumonia" / "patient-2" / "b.png", 2)
    with pytest.raises(DataError, match="names no patient"):
        load_image_folder(unnamed)


def test_dicom_patient_folders_win_over_the_header(tmp_path: Path):
    root = tmp_path / "dcm"
    for i in range(8):
        cls, folder = ("normal", "opacity")[i % 2], f"patient-F{i // 4}"
        write_dicom(root / cls / folder / f"{i}.dcm", np.full((8, 8), i * 100), f"H{i}")
    bundle = load_data(root, val_fraction=0.0)
    assert Counter(bundle.train.patient_ids) == {"F0": 4, "F1": 4}
    flat = tmp_path / "flat"
    for i in range(4):  # no patient folders: the Patient ID header as before
        write_dicom(flat / ("a", "b")[i % 2] / f"{i}.dcm", np.full((8, 8), i), f"H{i // 2}")
    assert set(load_data(flat, val_fraction=0.0).train.patient_ids) == {"H0", "H1"}


# --------------------------------------------------------------------------- synthetic


def test_synthetic_patients_look_alike_and_stay_in_one_split():
    bundle = make_synthetic(n_train=300, n_val=60, n_test=60, size=16, seed=4,
                            images_per_patient=(1, 5))
    again = make_synthetic(n_train=300, n_val=60, n_test=60, size=16, seed=4,
                           images_per_patient=(1, 5))
    train = bundle.train
    assert train.patient_ids == again.train.patient_ids
    assert train.dataset_id == again.train.dataset_id
    counts = Counter(train.patient_ids)
    assert set(counts.values()) <= {1, 2, 3, 4, 5} and max(counts.values()) == 5
    assert 60 <= len(counts) <= 200  # 300 images at 3 per patient on average
    ids = np.array(train.patient_ids)
    labels = train.labels.numpy()
    assert all(len(set(labels[ids == p])) == 1 for p in counts)  # one label per patient
    assert 0.45 < labels.mean() < 0.75
    all_ids = [set(ds.patient_ids) for ds in bundle.splits().values()]
    assert not (all_ids[0] & all_ids[1]) and not (all_ids[0] & all_ids[2])
    # a patient's images are much closer to each other than to other patients' images
    flat = train.images.reshape(len(train), -1).numpy()
    same, other = [], []
    for p, n in counts.items():
        if n >= 2:
            a, b = np.flatnonzero(ids == p)[:2]
            same.append(np.abs(flat[a] - flat[b]).mean())
            other.append(np.abs(flat[a] - flat[(a + 1) % len(flat)]).mean())
    assert np.mean(same) < 0.6 * np.mean(other)
    assert make_synthetic(n_train=40, n_val=0, n_test=0, size=8).train.patient_ids is None


def test_generated_patient_ids():
    ids = assign_patients(500, seed=1)
    assert ids == assign_patients(500, seed=1) and ids != assign_patients(500, seed=2)
    counts = Counter(ids)
    assert len(ids) == 500 and set(counts.values()) <= {1, 2, 3, 4, 5}
    assert abs(500 / len(counts) - 3) < 0.5  # uniform 1..5: three images on average
    assert set(Counter(assign_patients(100, 0, low=2, high=2)).values()) == {2}
    bundle = with_generated_patients(make_synthetic(n_train=60, n_val=20, n_test=20, size=8),
                                     seed=0)
    splits = [set(ds.patient_ids) for ds in bundle.splits().values()]
    assert not splits[0] & splits[2] and all(p.startswith("test-") for p in splits[2])


def test_summary_prints_mean_and_max_images_per_patient():
    ds = ImageDataset.from_uint8(_images(6), [0, 1, 0, 1, 0, 1], ("a", "b"), "t/train",
                                 ["p1", "p1", "p1", "p1", "p2", "p3"])
    lines = describe_patients(patient_summary(DataBundle(ds)))
    assert "2.0 images per training patient on average, up to 4" in lines[0]
