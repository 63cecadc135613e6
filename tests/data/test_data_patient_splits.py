"""No patient in two splits or at two sites: leakage refused, re-split by patient, federated
splits that deal whole patients."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from patient_data import leaky_npz
from PIL import Image

from privmed.data import (
    load_data,
    make_synthetic,
    resplit_by_patient,
    save_npz,
    split_sites,
)
from privmed.data.partition import partition_patients
from privmed.data.patients import count_shared_patients, shared_patients
from privmed.errors import ConfigError, DataError


def _patients_of(bundle) -> dict[str, set[str]]:
    return {split: set(ds.patient_ids) for split, ds in bundle.splits().items()}


def test_a_patient_in_train_and_test_is_refused_in_one_sentence(tmp_path: Path):
    path = leaky_npz(tmp_path / "leaky.npz", shared=3)
    with pytest.raises(DataError) as exc:
        load_data(path)
    text = str(exc.value)
    assert text.startswith(f"3 patient(s) of {path} have images in two splits (3 in train "
                           "and test)")
    assert f"privmed data inspect {path} --resplit-by-patient --out FIXED.npz" in text
    assert text.endswith(".") and "\n" not in text
    # without shared patients the same file loads
    clean = leaky_npz(tmp_path / "clean.npz", shared=0)
    assert load_data(clean).test.patient_ids is not None


def test_folder_splits_sharing_a_patient_are_refused(tmp_path: Path):
    root = tmp_path / "xrays"
    rng = np.random.default_rng(0)
    for split, pids in (("train", ("1", "2", "3")), ("val", ("4",)), ("test", ("5", "2"))):
        for pid in pids:
            for cls in ("normal", "pneumonia"):
                path = root / split / cls / f"patient-{pid}" / "a.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    with pytest.raises(DataError, match=r"1 patient\(s\) .* \(1 in train and test\)"):
        load_data(root)
    fixed = resplit_by_patient(load_data(root, allow_shared_patients=True), seed=0)
    assert not shared_patients(fixed.splits())


def test_resplit_by_patient_keeps_images_shares_and_labels(tmp_path: Path):
    source = load_data(leaky_npz(tmp_path / "leaky.npz", shared=5), val_fraction=0.0,
                       allow_shared_patients=True)
    assert count_shared_patients(source.splits()) == 5
    fixed = resplit_by_patient(source, seed=1)
    assert not shared_patients(fixed.splits())
    # the same images (with their labels and patients), only moved between splits
    def rows(bundle):
        return Counter((ds.images[i].numpy().tobytes(), int(ds.labels[i]), ds.patient_ids[i])
                       for ds in bundle.splits().values() for i in range(len(ds)))
    assert rows(fixed) == rows(source)
    for split, ds in source.splits().items():  # shares kept to within a few images
        assert abs(len(fixed.splits()[split]) - len(ds)) <= 5
        frac = np.mean(fixed.splits()[split].labels.numpy())
        assert abs(frac - np.mean(source.train.labels.numpy())) < 0.15  # stratified
    assert _patients_of(resplit_by_patient(source, seed=1)) == _patients_of(fixed)
    assert _patients_of(resplit_by_patient(source, seed=2)) != _patients_of(fixed)
    path = save_npz(fixed, tmp_path / "fixed.npz")
    assert _patients_of(load_data(path)) == _patients_of(fixed)  # and it loads


def test_resplit_needs_patients():
    with pytest.raises(DataError, match="name no patients"):
        resplit_by_patient(make_synthetic(n_train=40, n_val=10, n_test=0, size=8))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_split_sites_keeps_every_patient_at_one_site(scheme: str):
    bundle = make_synthetic(n_train=400, n_val=100, n_test=40, size=12, seed=2,
                            images_per_patient=(1, 5))
    # a val patient also in train (as in a hand-made bundle) must join them at their site
    val_ids = list(bundle.val.patient_ids)
    val_ids = [bundle.train.patient_ids[0] if p == val_ids[0] else p for p in val_ids]
    val = type(bundle.val)(bundle.val.images, bundle.val.labels, bundle.class_names,
                           bundle.val.name, tuple(val_ids))
    bundle = type(bundle)(bundle.train, val, bundle.test, bundle.source, bundle.info)
    sites = split_sites(bundle, 4, scheme=scheme, alpha=0.3, seed=5)
    assert sum(len(s.train) for s in sites) == 400
    assert sum(len(s.val) for s in sites if s.val is not None) == 100
    owners: dict[str, set[int]] = {}
    for i, site in enumerate(sites):
        assert site.info["by"] == "patient"
        for ds in (site.train, site.val):
            for p in ds.patient_ids if ds is not None else ():
                owners.setdefault(p, set()).add(i)
    assert all(len(at) == 1 for at in owners.values())
    assert len(owners) == len(set(bundle.train.patient_ids) | set(val_ids))
    counts = [len(s.train) for s in sites]
    if scheme == "iid":  # whole patients, yet about the same number of images per site
        assert max(counts) - min(counts) <= 10
    again = split_sites(bundle, 4, scheme=scheme, alpha=0.3, seed=5)
    assert [s.train.patient_ids for s in again] == [s.train.patient_ids for s in sites]


def test_partition_patients_limits():
    with pytest.raises(ConfigError, match="Cannot split 2 patients across 3 sites"):
        partition_patients([0, 1, 0, 1], ["a", "a", "b", "b"], 3)
    with pytest.raises(ConfigError, match="Could not give"):  # one patient holds nearly all
        partition_patients([0] * 30, ["big"] * 28 + ["x", "y"], 3, min_per_site=5,
                           max_tries=5)
