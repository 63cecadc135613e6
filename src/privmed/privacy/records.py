"""The records a privacy guarantee protects, as the ledger sees them.

A DP run protects one *unit*: a patient (all of their images in or out together) when
the data says who the patients are, else one image. The ledger charges every run to the
records it touches, so that the same people keep the same spend whatever file, export or
split they arrive in. Images are known by a hash of their pixels (the same image in two
files is one record); patients by their id, which the ledger stores only as a keyed hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from privmed.errors import ConfigError

PrivacyUnit = Literal["patient", "image"]
UNITS = ("patient", "image")


@dataclass(frozen=True)
class PrivacyRecords:
    """What one run touches: its ``unit``, one pixel hash per image (``image_keys``, 16 hex
    characters each) and, when known, the patient of each image (``patient_ids``: raw ids,
    which the ledger keys with a secret of its own before storing)."""

    unit: PrivacyUnit
    image_keys: tuple[str, ...]
    patient_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"Unknown privacy unit '{self.unit}': use 'patient' or 'image'.")
        if self.unit == "patient" and self.patient_ids is None:
            raise ConfigError("A patient-level guarantee needs the patient of every image.")
        if self.patient_ids is not None and len(self.patient_ids) != len(self.image_keys):
            raise ConfigError("Every image needs exactly one patient id.")

    @property
    def count(self) -> int:
        """Units protected: distinct patients, or images."""
        if self.unit == "patient":
            return len(set(self.patient_ids or ()))
        return len(self.image_keys)


def image_keys(pixels_uint8: np.ndarray) -> tuple[str, ...]:
    """One key per image of ``pixels_uint8`` (``N x ...``): SHA-256 of its shape and bytes,
    truncated to 16 hex characters (64 bits: collisions are negligible at any dataset size
    a hospital holds, and a collision only charges two images together)."""
    arr = np.ascontiguousarray(pixels_uint8)
    shape = repr(arr.shape[1:]).encode()
    return tuple(hashlib.sha256(shape + arr[i].tobytes()).hexdigest()[:16]
                 for i in range(arr.shape[0]))


def protected_units(requested: str | None, dataset: Any) -> tuple[PrivacyUnit, int]:
    """``(unit, count)`` for a DP run on the ImageDataset ``dataset``: the unit as
    :func:`resolve_unit` gives it, and how many patients (or images) it protects."""
    unit = resolve_unit(requested, dataset.patient_ids is not None)
    return unit, dataset.num_patients if unit == "patient" else len(dataset)


def resolve_unit(requested: str | None, patients_known: bool) -> PrivacyUnit:
    """``requested`` ('patient', 'image', or None / 'auto' for: patient whenever the
    patients are known), refusing a patient-level guarantee on data without patient ids."""
    if requested in (None, "auto"):
        return "patient" if patients_known else "image"
    if requested not in UNITS:
        raise ConfigError(f"Unknown privacy unit '{requested}': use 'patient', 'image' or "
                          "'auto'.")
    if requested == "patient" and not patients_known:
        raise ConfigError("--privacy-unit patient needs the patient of every training image "
                          "(a DICOM Patient ID, a 'patient' column of --labels-csv, a "
                          "'train_patients' array in the .npz or patient-<id>/ folders).")
    return requested  # type: ignore[return-value]
