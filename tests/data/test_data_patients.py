"""Patient ids from DICOM headers and label CSVs; validation holds out whole patients."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dicom_folder import patient_folder

from privmed.data import load_data
from privmed.data.dataset import DataBundle, ImageDataset
from privmed.data.patients import describe_patients, patient_holdout, patient_summary
from privmed.errors import DataError

# 30 patients with 1-4 images each (75 images): repeated Patient IDs, as in a real PACS.
COUNTS = [1, 2, 3, 4] * 7 + [4, 4]


def test_dicom_validation_split_holds_out_whole_patients(tmp_path: Path):
    owners = patient_folder(tmp_path / "dcm", COUNTS)
    bundle = load_data(tmp_path / "dcm", seed=3)
    train, val = bundle.train, bundle.val
    assert train.patient_ids is not None and val is not None and val.patient_ids is not None
    assert len(train) + len(val) == sum(COUNTS)
    assert not set(train.patient_ids) & set(val.patient_ids)  # today: all of val in train
    assert 1 <= val.num_patients < train.num_patients
    assert bundle.info["val_from_train"]["by"] == "patient"
    # every patient keeps all of their images, whichever side they are on
    per_patient = Counter(train.patient_ids) + Counter(val.patient_ids)
    assert per_patient == Counter(owners.values())
    summary = patient_summary(bundle)
    assert summary["train"] == train.num_patients and summary["val"] == val.num_patients
    assert summary["max_images_per_patient"] == 4 and summary["val_by_patient"]
    assert summary["val_shares_with_train"] == 0
    assert any("whole patients" in line for line in describe_patients(summary))
    # seeded: the same patients are held out again
    assert load_data(tmp_path / "dcm", seed=3).val.patient_ids == val.patient_ids


def test_a_labels_csv_patient_column_overrides_the_header(tmp_path: Path):
    owners = patient_folder(tmp_path / "dcm", [2] * 12)
    rows = [(f"{'normal' if int(p[1:]) % 2 == 0 else 'opacity'}/{name}",
             "normal" if int(p[1:]) % 2 == 0 else "opacity", f"csv-{int(p[1:]) // 2}")
            for name, p in owners.items()]  # two header patients per CSV patient
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("file", "label", "patient"), *rows])
    bundle = load_data(tmp_path / "dcm", labels_csv=tmp_path / "labels.csv")
    assert set(bundle.train.patient_ids) | set(bundle.val.patient_ids) <= {
        f"csv-{i}" for i in range(6)}
    assert not set(bundle.train.patient_ids) & set(bundle.val.patient_ids)
    assert bundle.train.max_images_per_patient == 4


def test_files_without_patient_id_mean_patients_unknown(tmp_path: Path):
    from dicom_folder import write_dicom

    for i in range(12):
        write_dicom(tmp_path / "dcm" / ("a", "b")[i % 2] / f"{i}.dcm",
                    np.full((8, 8), i * 100), "")
    bundle = load_data(tmp_path / "dcm")
    assert bundle.train.patient_ids is None and patient_summary(bundle) is None
    assert "by" not in bundle.info["val_from_train"]


def test_patient_holdout_edge_cases():
    labels = np.array([0, 1, 0, 1])
    assert patient_holdout(labels, ("a",) * 4, 0.1, 0) is None  # one patient: nobody to hold out
    train, held = patient_holdout(labels, ("a", "a", "b", "c"), 0.1, 0)
    assert len(train) + len(held) == 4 and set(train).isdisjoint(held)
    ids = np.array(["a", "a", "b", "c"])
    assert set(ids[train]).isdisjoint(ids[held])


def test_test_split_sharing_patients_with_train_is_reported():
    images = np.zeros((6, 4, 4), dtype=np.uint8)
    train = ImageDataset.from_uint8(images, [0, 1, 0, 1, 0, 1], ("a", "b"), "t/train",
                                    ["p1", "p1", "p2", "p3", "p3", "p4"])
    test = ImageDataset.from_uint8(images[:2], [0, 1], ("a", "b"), "t/test", ["p1", "p9"])
    summary = patient_summary(DataBundle(train, None, test, "t"))
    assert summary["test_shares_with_train"] == 1
    assert any("1 patient(s) of the test split" in line for line in describe_patients(summary))
    with pytest.raises(DataError, match="patient ids"):
        ImageDataset.from_uint8(images, [0] * 6, ("a", "b"), "x", ["p1"])
