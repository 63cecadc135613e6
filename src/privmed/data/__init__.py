"""Data front door: every source (synthetic, MedMNIST .npz, image or DICOM folder) becomes
a validated :class:`DataBundle` of :class:`ImageDataset` splits.

Heavy optional pieces (pydicom, scikit-learn) are imported only when a source needs them,
so ``import privmed.data`` stays quick for the CLI.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from privmed.data._common import DICOM_SUFFIXES, IMAGE_SUFFIXES, resize_bundle
from privmed.data.dataset import DataBundle, ImageDataset
from privmed.data.folder import load_image_folder
from privmed.data.medmnist import (
    KNOWN_DATASETS,
    cached_medmnist_path,
    fetch_medmnist,
    load_medmnist_npz,
    save_npz,
)
from privmed.data.partition import partition_indices, split_sites
from privmed.data.patients import (
    assign_patients,
    check_patient_leakage,
    patient_holdout,
    resplit_by_patient,
)
from privmed.data.synthetic import make_synthetic
from privmed.errors import ConfigError, DataError

__all__ = [
    "DataBundle", "ImageDataset", "assign_patients", "describe", "fetch_medmnist", "load_data",
    "load_dicom", "load_image_folder", "load_medmnist_npz", "make_synthetic",
    "partition_indices", "resplit_by_patient", "save_npz", "split_sites",
]
SYNTHETIC_PATIENTS = "synthetic-patients"  # synthetic data whose patients have 1-5 images

_DICOM_SNIFF_LIMIT = 50  # extensionless files checked for a DICOM preamble


def load_dicom(path: str | Path, size: int | None = None,
               labels_csv: str | Path | None = None) -> DataBundle:
    """See :func:`privmed.data.dicom.load_dicom` (imported lazily: pydicom is slow to load)."""
    from privmed.data.dicom import load_dicom as _load_dicom

    return _load_dicom(path, size=size, labels_csv=labels_csv)


def _looks_like_dicom(root: Path) -> bool:
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    n_dicom = sum(p.suffix.lower() in DICOM_SUFFIXES for p in files)
    n_image = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in files)
    if n_dicom or n_image:
        return n_dicom >= n_image
    from pydicom.misc import is_dicom

    return any(is_dicom(p) for p in files[:_DICOM_SNIFF_LIMIT])


def _load(source: str | Path, size: int | None, labels_csv: str | Path | None,
          seed: int) -> DataBundle:
    text = str(source).strip()
    if isinstance(source, str) and text.lower() in ("synthetic", SYNTHETIC_PATIENTS):
        if labels_csv is not None:
            raise ConfigError(f"A labels CSV only applies to DICOM folders, not to '{text}'.")
        per_patient = (1, 5) if text.lower() == SYNTHETIC_PATIENTS else None
        return make_synthetic(size=size or 28, seed=seed, images_per_patient=per_patient)
    path = Path(text).expanduser()
    if path.is_dir():
        if labels_csv is not None or _looks_like_dicom(path):
            return load_dicom(path, size=size, labels_csv=labels_csv)
        return load_image_folder(path, size=size)
    if labels_csv is not None and path.exists():
        raise ConfigError(f"A labels CSV only applies to DICOM folders, not to {path}.")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return load_medmnist_npz(path)
        raise DataError(f"Data file {path} is not a .npz file; privmed reads MedMNIST .npz "
                        "files, image folders and DICOM folders.")
    name = text.lower()
    if isinstance(source, str) and name in KNOWN_DATASETS:
        published = KNOWN_DATASETS[name]["md5"]
        want = size if size in published else 28  # other sizes are resized from 28 px
        cached = cached_medmnist_path(name, want)
        if cached.is_file():
            return load_medmnist_npz(cached)
        flag = f" --size {want}" if want != 28 else ""
        raise ConfigError(f"Dataset '{name}' is not downloaded yet; run `privmed data fetch "
                          f"{name}{flag}` first (it is stored at {cached}).")
    raise DataError(f"Data source {text} does not exist (expected a .npz file, an image or "
                    "DICOM folder, 'synthetic' or a dataset name such as 'pneumoniamnist').")


def _carve_val(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """Hold out a stratified ``fraction`` of train as val (deterministic in ``seed``); whole
    patients when the images' patients are known."""
    from sklearn.model_selection import train_test_split

    labels = bundle.train.labels.numpy()
    n = labels.shape[0]
    n_val = math.ceil(fraction * n)  # what train_test_split uses for a float test_size
    if n_val < 1 or n - n_val < 1:
        return bundle  # too few images to hold any out; training code copes with no val
    idx = np.arange(n)
    carved: dict = {"fraction": fraction, "seed": seed}
    by_patient = (patient_holdout(labels, bundle.train.patient_ids, fraction, seed)
                  if bundle.train.patient_ids is not None else None)
    if by_patient is not None:
        train_idx, val_idx = by_patient
        carved["by"] = "patient"
    else:
        try:
            train_idx, val_idx = train_test_split(idx, test_size=n_val, stratify=labels,
                                                  random_state=seed)
        except ValueError:  # a class too rare to stratify: plain random hold-out
            train_idx, val_idx = train_test_split(idx, test_size=n_val, random_state=seed)
    base = bundle.train.name.rsplit("/", 1)[0]
    train = bundle.train.subset(np.sort(train_idx), name=bundle.train.name)
    val = bundle.train.subset(np.sort(val_idx), name=f"{base}/val")
    info = {**bundle.info, "val_from_train": carved}
    return DataBundle(train, val, bundle.test, bundle.source, info)


def load_data(source: str | Path, *, size: int | None = None,
              labels_csv: str | Path | None = None, val_fraction: float = 0.1,
              seed: int = 0, allow_shared_patients: bool = False) -> DataBundle:
    """Load any supported source into a DataBundle.

    ``source``: ``"synthetic"`` (``"synthetic-patients"``: the same kind of images, from
    patients of 1-5 images each); a MedMNIST ``.npz`` file; a folder of DICOM files (class
    folders or ``labels_csv``); a folder of PNG/JPEG images; or a dataset name such as
    ``"pneumoniamnist"`` fetched earlier with ``privmed data fetch``. ``size`` resizes all
    images to ``size x size``. Without a val split, a stratified ``val_fraction`` of train
    is held out (seeded): whole patients when the images' patients are known.

    When the patients are known and one has images in two of the source's splits, a
    DataError says how to re-split by patient, unless ``allow_shared_patients`` (for
    :func:`resplit_by_patient`, which repairs it).
    """
    if size is not None and (isinstance(size, bool) or size < 1):
        raise ConfigError(f"Image size must be a positive number of pixels, got {size}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    bundle = _load(source, size, labels_csv, seed)
    if not allow_shared_patients:  # before carving val: that one is by patient already
        check_patient_leakage(bundle.splits(), str(source))
    if size is not None and bundle.train.image_shape[1:] != (size, size):
        bundle = resize_bundle(bundle, size)
    if bundle.val is None and val_fraction > 0:
        bundle = _carve_val(bundle, val_fraction, seed)
    return bundle


def describe(bundle: DataBundle) -> list[dict]:
    """One row per split for ``privmed data inspect``.

    Keys: ``split``, ``n``, ``shape`` (``(C, H, W)``), ``counts`` ({class: count}, in class
    order), ``dataset_id`` (the content hash the privacy ledger keys on).
    """
    rows = []
    for split, ds in bundle.splits().items():
        rows.append({
            "split": split,
            "n": len(ds),
            "shape": ds.image_shape,
            "counts": dict(zip(ds.class_names, ds.class_counts(), strict=True)),
            "dataset_id": ds.dataset_id,
        })
    return rows
