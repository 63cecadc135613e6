"""Patients, when the data says who they are: whole patients in one split, and a summary.

A patient's images look alike (same anatomy, same scanner, follow-ups of the same
finding). A validation split that shares patients with training overstates the model
and, since the validation metrics pick the epoch and the threshold, hides overfitting;
so when patient ids are known (DICOM Patient ID, a ``patient`` column of a labels CSV)
the validation images are whole patients held out of training.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np

from privmed.data.dataset import DataBundle


def patient_holdout(labels: np.ndarray, patients: tuple[str, ...], fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices ``(train, held_out)`` holding out about ``fraction`` of the images as whole
    patients, stratified by label where the patients allow it (seeded). None when there
    are fewer than two patients, so that nobody can be held out whole."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    groups = np.asarray(patients)
    n_patients = len(set(patients))
    if n_patients < 2:
        return None
    idx = np.arange(len(groups))
    n_folds = max(2, round(1.0 / fraction))
    if n_patients >= n_folds:
        try:
            with warnings.catch_warnings():  # "least populated class has only ... members"
                warnings.simplefilter("ignore", UserWarning)
                folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
                train, held = next(folds.split(idx, labels, groups))
            if len(train) and len(held):
                return np.sort(train), np.sort(held)
        except ValueError:
            pass  # too few patients per class to stratify: plain group split below
    n_held = max(1, min(n_patients - 1, math.ceil(fraction * n_patients)))
    split = GroupShuffleSplit(n_splits=1, test_size=n_held, random_state=seed)
    train, held = next(split.split(idx, labels, groups))
    return np.sort(train), np.sort(held)


def patient_summary(bundle: DataBundle) -> dict | None:
    """Patients per split, the most images one training patient has, whether validation
    holds out whole patients, and patients a split shares with train; None when the
    training patients are unknown."""
    train_ids = bundle.train.patient_ids
    if train_ids is None:
        return None
    splits = bundle.splits()
    out: dict = {split: ds.num_patients for split, ds in splits.items()}
    counts = Counter(train_ids)
    out["max_images_per_patient"] = max(counts.values())
    out["mean_images_per_patient"] = round(len(train_ids) / len(counts), 3)
    for split in ("val", "test"):
        ds = splits.get(split)
        if ds is not None and ds.patient_ids is not None:
            out[f"{split}_shares_with_train"] = len(set(ds.patient_ids) & set(counts))
    carved = bundle.info.get("val_from_train") or {}
    out["val_by_patient"] = carved.get("by") == "patient"
    return out


def describe_patients(summary: dict | None) -> list[str]:
    """Sentences for the console (empty when the patients are unknown)."""
    if not summary:
        return []
    parts = [f"{summary[s]} in {s}" for s in ("train", "val", "test")
             if summary.get(s) is not None]
    lines = [f"Patients: {', '.join(parts)}; up to {summary['max_images_per_patient']} "
             f"images per training patient."]
    if summary.get("val_by_patient"):
        lines.append("The validation split holds out whole patients (none of its patients "
                     "is in training).")
    for split in ("val", "test"):
        shared = summary.get(f"{split}_shares_with_train")
        if shared:
            lines.append(f"Warning: {shared} patient(s) of the {split} split also have images "
                         f"in train, so its metrics are optimistic; split the data by patient.")
    return lines
