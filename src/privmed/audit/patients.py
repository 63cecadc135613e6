"""Membership per patient: the unit of the membership game, and the claim it is held to.

A per-patient audit plays the membership game with *patients*: a patient's images are
members or non-members together (in the target's data, in every shadow model and in the
one-run audit's canary draw), a patient's score is the mean of their images' scores,
and ROC metrics and empirical ε are computed over patients. The per-image audit is the
same game with every image its own unit. This module holds the deterministic parts
(grouping, scores per unit, the claimed ε per unit); the random draws stay in
:mod:`privmed.audit.membership`.

Units are numbered ``0 .. U-1``; ``group[i]`` is the unit of image ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from privmed.data.dataset import ImageDataset
from privmed.errors import ConfigError, DataError
from privmed.privacy import default_delta
from privmed.privacy.group import group_privacy

UNITS = ("patient", "image")
#: How a patient's score is made of their images' scores (recorded with the audit).
AGGREGATION = "mean of their images' scores"


def audit_unit(requested: str | None, run_unit: str | None, patients_known: bool) -> str:
    """The unit the audit draws members in: ``requested`` ('patient' or 'image'), else
    (None / 'auto') the unit the run was private in, else patient whenever the data
    names the patients."""
    unit = requested if requested not in (None, "auto") else (
        run_unit or ("patient" if patients_known else "image"))
    if unit not in UNITS:
        raise ConfigError(f"Unknown audit unit '{unit}': use 'patient', 'image' or 'auto'.")
    if unit == "patient" and not patients_known:
        raise DataError("A per-patient audit needs the patient of every training image; "
                        "load the data with its patient ids, as for training.")
    return unit


def unit_groups(dataset: ImageDataset, unit: str) -> tuple[np.ndarray, int]:
    """The unit of each image of ``dataset`` (patients in order of first appearance, or
    every image its own) and the number of units."""
    if unit == "image":
        return np.arange(len(dataset)), len(dataset)
    if dataset.patient_ids is None:
        raise DataError(f"The {dataset.name} split names no patients, so its images cannot "
                        "be drawn per patient; load it with its patient ids.")
    return dataset.patient_index


def unit_labels(labels: np.ndarray, group: np.ndarray, units: int,
                num_classes: int) -> np.ndarray:
    """Each unit's most frequent label (the smallest on a tie): what members and
    non-members are matched on, class by class."""
    counts = np.zeros((units, num_classes), dtype=np.int64)
    np.add.at(counts, (group, labels), 1)
    return counts.argmax(axis=1)


def images_of(members: list[np.ndarray], picked: Sequence[int] | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """The images of the ``picked`` units, and the position (0 ..) of each one's unit in
    ``picked``."""
    parts = [members[u] for u in picked]
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64),
            np.repeat(np.arange(len(parts)), sizes))


def check_disjoint(train: ImageDataset, outside: ImageDataset) -> None:
    """Refuse a per-patient audit whose non-member split shares patients with training:
    those patients would be members and non-members at once."""
    shared = set(train.patient_ids or ()) & set(outside.patient_ids or ())
    if shared:
        raise DataError(f"{len(shared)} patient(s) of the {outside.name} split also have "
                        "training images, so they are not non-members; audit data split by "
                        "patient.")


def population_ids(train: ImageDataset, outside: ImageDataset, idx_in: np.ndarray,
                   idx_out: np.ndarray) -> tuple[str, ...] | None:
    """Patient ids of the audit population (members' images, then non-members'), or None
    when neither split names them. Each side's ids get a prefix so that equal ids in two
    splits stay two patients; an image of a split without ids is its own patient (what
    the per-image game assumes anyway)."""
    if train.patient_ids is None and outside.patient_ids is None:
        return None

    def side(ds: ImageDataset, idx: np.ndarray, tag: str) -> list[str]:
        ids = ds.patient_ids
        return [f"{tag}/{ids[i]}" if ids is not None else f"{tag}#{i}" for i in idx.tolist()]

    return tuple(side(train, idx_in, "in") + side(outside, idx_out, "out"))


def build_population(train: ImageDataset, outside: ImageDataset, idx_in: np.ndarray,
               idx_out: np.ndarray) -> ImageDataset:
    """Members' images (``idx_in`` of train) then non-members' (``idx_out``), with their
    patients, so that shadow models train at the run's unit."""
    return ImageDataset(torch.cat([train.images[idx_in], outside.images[idx_out]]),
                        torch.cat([train.labels[idx_in], outside.labels[idx_out]]),
                        train.class_names, "audit population",
                        population_ids(train, outside, idx_in, idx_out))


def unit_scores(scores: np.ndarray, group: np.ndarray, units: int) -> np.ndarray:
    """A unit's score from its images' scores: the mean.

    The mean rather than the sum or the maximum: a patient's images are correlated (one
    body, one scanner), so summing their log-likelihood ratios would count the same
    evidence several times and rank patients by how many images they have rather than
    by membership; the mean keeps patients of 1 and 20 images on one scale, so one
    threshold fits all, and is the natural LOSS score (the patient's average loss). The
    maximum would turn one noisy image into a false "member". Any aggregation gives a
    valid lower bound (the bound holds for every score); the choice only affects power.
    With every image its own unit this is the identity."""
    return (np.bincount(group, weights=scores, minlength=units)
            / np.bincount(group, minlength=units))


def unit_claim(privacy: dict[str, Any], unit: str, train: ImageDataset) -> dict[str, Any]:
    """The claimed (ε, δ) per ``unit`` of a run whose results.json ``privacy`` is given
    (``train``: its training data), and how it follows from the run's own unit:

    * the same unit: as trained;
    * per patient from a per-image run: group privacy over the largest patient's k
      training images;
    * per image from a per-patient run: adding or removing one image changes its
      patient's record, a change add/remove-patient DP covers by group privacy of two
      (remove the patient, add them back changed); exactly ε only for single-image
      patients.

    ``epsilon`` is None without DP or when group privacy leaves no guarantee (δ ≥ 1);
    ``delta`` is then the run's (or the default for the units), for the empirical bound.
    """
    units = len(set(train.patient_ids or ())) if unit == "patient" else len(train)
    if not privacy.get("enabled"):
        return {"epsilon": None, "delta": default_delta(units), "unit": unit,
                "run_unit": None, "basis": "no DP"}
    eps, delta = float(privacy["epsilon"]), float(privacy["delta"])
    run_unit = privacy.get("unit") or "image"  # results from before patient-level DP
    out = {"epsilon": eps, "delta": delta, "unit": unit, "run_unit": run_unit,
           "basis": "as trained"}
    if run_unit == unit:
        return out
    k = int(train.max_images_per_patient or 1) if unit == "patient" else 2
    eps_k, delta_k = group_privacy(eps, delta, k)
    if unit == "patient":
        basis = (f"from the per-image ε by group privacy over the largest training "
                 f"patient's {k} images")
    else:
        basis = "from the per-patient ε by group privacy of 2: one image changes its patient"
    if delta_k >= 1:
        return {**out, "epsilon": None, "basis": basis + ": δ ≥ 1, no guarantee"}
    return {**out, "epsilon": eps_k, "delta": delta_k, "basis": basis}
