"""Patients, when the data says who they are: whole patients in one split, and a summary.

A patient's images look alike (same anatomy, same scanner, follow-ups of the same
finding). A validation split that shares patients with training overstates the model
and, since the validation metrics pick the epoch and the threshold, hides overfitting;
so when patient ids are known (DICOM Patient ID, a ``patient`` column of a labels CSV,
``<split>_patients`` of an npz, ``patient-<id>/`` folders) the validation images are
whole patients held out of training, a source whose splits share a patient is refused,
and :func:`resplit_by_patient` repairs it. :func:`assign_patients` makes up ids for
benchmarks on data that publishes none.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from itertools import combinations

import numpy as np
import torch

from privmed.data.dataset import DataBundle, ImageDataset
from privmed.errors import ConfigError, DataError


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
    lines = [f"Patients: {', '.join(parts)}; {summary['mean_images_per_patient']:.1f} images "
             f"per training patient on average, up to {summary['max_images_per_patient']}."]
    if summary.get("val_by_patient"):
        lines.append("The validation split holds out whole patients (none of its patients "
                     "is in training).")
    for split in ("val", "test"):
        shared = summary.get(f"{split}_shares_with_train")
        if shared:
            lines.append(f"Warning: {shared} patient(s) of the {split} split also have images "
                         f"in train, so its metrics are optimistic; split the data by patient.")
    return lines


# --------------------------------------------------------------------------- leakage


def shared_patients(splits: dict[str, ImageDataset]) -> dict[tuple[str, str], int]:
    """How many patients each pair of splits shares, for the pairs that share any.

    Only splits whose patients are known count, and the empty id (DICOM files without a
    Patient ID, kept together as one unnamed group) is nobody in particular, so never shared.
    """
    known = {split: set(ds.patient_ids) - {""} for split, ds in splits.items()
             if ds.patient_ids is not None}
    out: dict[tuple[str, str], int] = {}
    for a, b in combinations(known, 2):
        n = len(known[a] & known[b])
        if n:
            out[(a, b)] = n
    return out


def count_shared_patients(splits: dict[str, ImageDataset]) -> int:
    """Distinct patients with images in more than one split (see :func:`shared_patients`)."""
    seen: Counter[str] = Counter()
    for ds in splits.values():
        if ds.patient_ids is not None:
            seen.update(set(ds.patient_ids) - {""})
    return sum(1 for n in seen.values() if n > 1)


def check_patient_leakage(splits: dict[str, ImageDataset], source: str) -> None:
    """Refuse (DataError) when a patient has images in two splits: the model would be
    validated or tested on people it trained on, and every metric would be optimistic."""
    pairs = shared_patients(splits)
    if not pairs:
        return
    total = count_shared_patients(splits)
    detail = ", ".join(f"{n} in {a} and {b}" for (a, b), n in pairs.items())
    raise DataError(
        f"{total} patient(s) of {source} have images in two splits ({detail}), so the model "
        f"would be scored on patients it trained on; re-split by patient with `privmed data "
        f"inspect {source} --resplit-by-patient --out FIXED.npz` and use FIXED.npz instead.")


def _majority_labels(labels: np.ndarray, owner: np.ndarray, n_patients: int,
                     n_classes: int) -> np.ndarray:
    """Each patient's most frequent label (ties: the lowest)."""
    counts = np.zeros((n_patients, n_classes), dtype=np.int64)
    np.add.at(counts, (owner, labels), 1)
    return counts.argmax(axis=1)


def _pack_patients(sizes: np.ndarray, strata: np.ndarray, weights: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Bin of each patient: within every stratum, patients in random order each go to the
    bin furthest below its share ``weights`` of that stratum's images. Random order, not
    largest first, so that big patients are not all dealt to the biggest bin."""
    where = np.full(len(sizes), -1, dtype=np.int64)
    share = weights / weights.sum()
    for k in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == k))
        target = share * sizes[members].sum()
        filled = np.zeros(len(weights))
        for p in members:
            b = int(np.argmax(target - filled))
            where[p] = b
            filled[b] += sizes[p]
    # A bin the strata left empty takes the smallest patient of the bin with the most.
    for b in range(len(weights)):
        if not (where == b).any():
            donor = int(np.bincount(where, minlength=len(weights)).argmax())
            mine = np.flatnonzero(where == donor)
            where[mine[np.argmin(sizes[mine])]] = b
    return where


def resplit_by_patient(bundle: DataBundle, seed: int = 0) -> DataBundle:
    """The same images re-split so that every patient is in exactly one split.

    Keeps the splits the bundle has and their shares of the images (approximately: whole
    patients move), stratified by each patient's majority label where the patients allow
    it; seeded. Every split's patients must be known.
    """
    splits = bundle.splits()
    source = bundle.source or "the data"
    unknown = [split for split, ds in splits.items() if ds.patient_ids is None]
    if unknown:
        raise DataError(f"The {' and '.join(unknown)} split(s) of {source} name no patients, "
                        "so there is nothing to re-split by; add patient ids first.")
    ids = [p for ds in splits.values() for p in ds.patient_ids]
    names, owner = np.unique(np.array(ids, dtype=str), return_inverse=True)
    if len(names) < len(splits):
        raise DataError(f"{source} has {len(names)} patient(s), too few to fill its "
                        f"{len(splits)} splits with whole patients.")
    labels = np.concatenate([ds.labels.numpy() for ds in splits.values()])
    sizes = np.bincount(owner, minlength=len(names))
    strata = _majority_labels(labels, owner, len(names), bundle.train.num_classes)
    weights = np.array([len(ds) for ds in splits.values()], dtype=np.float64)
    where = _pack_patients(sizes, strata, weights, np.random.default_rng(seed))[owner]

    images = torch.cat([ds.images for ds in splits.values()])
    base = bundle.train.name.rsplit("/", 1)[0]
    parts = {}
    for b, split in enumerate(splits):
        idx = np.flatnonzero(where == b)
        parts[split] = ImageDataset(images[idx], torch.from_numpy(labels[idx]),
                                    bundle.class_names, f"{base}/{split}",
                                    tuple(ids[i] for i in idx))
    info = {**bundle.info, "resplit_by_patient": {"seed": seed}}
    return DataBundle(parts["train"], parts.get("val"), parts.get("test"), bundle.source, info)


# --------------------------------------------------------------------------- generated ids


def patient_sizes(n_images: int, rng: np.random.Generator, low: int = 1, high: int = 5
                  ) -> np.ndarray:
    """Images per patient, each drawn uniformly from ``low..high``, summing to ``n_images``
    (the last patient gets what is left, so may have fewer than ``low``)."""
    if n_images < 1 or not 1 <= low <= high:
        raise ConfigError(f"Generated patients need n_images >= 1 and 1 <= low <= high, got "
                          f"{n_images}, {low}, {high}.")
    draws = rng.integers(low, high + 1, n_images // low + 1)
    cum = np.cumsum(draws)
    last = int(np.searchsorted(cum, n_images))
    sizes = draws[:last + 1].copy()
    sizes[-1] -= int(cum[last]) - n_images
    return sizes


def assign_patients(n_images: int, seed: int, low: int = 1, high: int = 5,
                    prefix: str = "gen-") -> tuple[str, ...]:
    """Made-up patient ids for ``n_images`` images of a dataset that has none: patients of
    ``low..high`` images (uniform, seeded), images dealt to them at random.

    For benchmarks only (e.g. PneumoniaMNIST, which publishes no patient ids): these
    "patients" share no anatomy. Give each split its own ``prefix`` so that no generated
    patient spans two splits.
    """
    rng = np.random.default_rng(seed)
    sizes = patient_sizes(n_images, rng, low, high)
    owner = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    width = len(str(len(sizes) - 1))
    return tuple(f"{prefix}{i:0{width}d}" for i in owner.tolist())


def with_generated_patients(bundle: DataBundle, seed: int, low: int = 1, high: int = 5
                            ) -> DataBundle:
    """``bundle`` with :func:`assign_patients` ids in every split (``train-``, ``val-``, ...
    prefixes; each split its own seed stream)."""
    parts = {}
    for i, (split, ds) in enumerate(bundle.splits().items()):
        ids = assign_patients(len(ds), seed * 3 + i, low, high, prefix=f"{split}-")
        parts[split] = ImageDataset(ds.images, ds.labels, ds.class_names, ds.name, ids)
    info = {**bundle.info, "generated_patients": {"seed": seed, "low": low, "high": high}}
    return DataBundle(parts["train"], parts.get("val"), parts.get("test"), bundle.source, info)
