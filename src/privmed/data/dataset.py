"""The one in-memory form every data source is turned into.

``ImageDataset`` holds float32 images ``N x C x H x W`` scaled to [0, 1],
int64 labels, class names, optionally the patient each image belongs to, and a
stable content hash (``dataset_id``) that the privacy ledger keys spends on.
``DataBundle`` groups the train / val / test splits of one source. Both validate
themselves on construction so that every later stage can trust the tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from privmed.errors import DataError

if TYPE_CHECKING:
    from privmed.privacy.records import PrivacyRecords

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images ``N x C x H x W`` (float32 in [0, 1]), labels ``N`` (int64), class names.

    ``patient_ids`` (one string per image, or None when unknown) lets splits keep a
    patient's images together; it is not part of ``dataset_id``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str = "dataset"
    patient_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        where = f"'{self.name}'"
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            shape = tuple(getattr(self.images, "shape", ()))
            raise DataError(f"Images in {where} must be N x C x H x W, got shape {shape}.")
        if self.images.dtype != torch.float32:
            object.__setattr__(self, "images", self.images.float())
        labels = torch.as_tensor(self.labels).reshape(-1).long()
        object.__setattr__(self, "labels", labels)
        n = self.images.shape[0]
        if n == 0:
            raise DataError(f"Dataset {where} contains no images.")
        if labels.shape[0] != n:
            raise DataError(f"Dataset {where} has {n} images but {labels.shape[0]} labels.")
        if len(self.class_names) < 2:
            raise DataError(f"Dataset {where} needs at least two classes.")
        if not torch.isfinite(self.images).all():
            raise DataError(f"Dataset {where} contains NaN or infinite pixel values.")
        if self.patient_ids is not None:
            ids = tuple(str(p) for p in self.patient_ids)
            if len(ids) != n:
                raise DataError(f"Dataset {where} has {n} images but {len(ids)} patient ids.")
            object.__setattr__(self, "patient_ids", ids)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= len(self.class_names):
            raise DataError(
                f"Dataset {where} has label {lo if lo < 0 else hi} outside the "
                f"{len(self.class_names)} classes {list(self.class_names)}."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    @property
    def num_patients(self) -> int | None:
        """Distinct patients, or None when the images' patients are not known."""
        return None if self.patient_ids is None else len(set(self.patient_ids))

    @property
    def max_images_per_patient(self) -> int | None:
        """The most images any one patient has here (None when patients are unknown)."""
        if self.patient_ids is None:
            return None
        from collections import Counter

        return max(Counter(self.patient_ids).values())

    @cached_property
    def patient_index(self) -> tuple[np.ndarray, int] | None:
        """Each image's patient as a number ``0 .. P-1`` (in order of first appearance) and
        P, or None when the patients are unknown; computed once per dataset."""
        if self.patient_ids is None:
            return None
        numbers: dict[str, int] = {}
        index = np.fromiter((numbers.setdefault(p, len(numbers)) for p in self.patient_ids),
                            dtype=np.int64, count=len(self.patient_ids))
        return index, len(numbers)

    @cached_property
    def image_keys(self) -> tuple[str, ...]:
        """One pixel hash per image (``privacy.records.image_keys``), computed once: the
        ledger asks for them at every reservation and status."""
        from privmed.privacy.records import image_keys

        return image_keys(self.to_uint8())

    @cached_property
    def dataset_id(self) -> str:
        """Stable hash of the content (8-bit pixels, labels, class names)."""
        digest = hashlib.sha256()
        digest.update(repr((self.image_shape, self.class_names)).encode())
        digest.update(self.to_uint8().tobytes())
        digest.update(self.labels.numpy().astype("<i8").tobytes())
        return digest.hexdigest()[:16]

    def privacy_records(self, unit: str | None = None) -> PrivacyRecords:
        """The records a DP run on this data touches, at ``unit`` ('patient', 'image', or
        None for patient whenever the patients are known)."""
        from privmed.privacy.records import PrivacyRecords, resolve_unit

        return PrivacyRecords(resolve_unit(unit, self.patient_ids is not None),
                              self.image_keys, self.patient_ids)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor, name: str | None = None
               ) -> ImageDataset:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        ids = (None if self.patient_ids is None
               else tuple(self.patient_ids[i] for i in idx.tolist()))
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names,
                            name or self.name, ids)

    def to_uint8(self) -> np.ndarray:
        """Images as uint8 ``N x H x W`` (grey) or ``N x H x W x C`` (MedMNIST layout)."""
        arr = (self.images.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
        return arr[:, 0] if arr.shape[1] == 1 else np.ascontiguousarray(arr.transpose(0, 2, 3, 1))

    @classmethod
    def from_uint8(cls, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                   name: str = "dataset", patient_ids: Sequence[str] | None = None
                   ) -> ImageDataset:
        """Build from MedMNIST-style uint8 arrays ``N x H x W`` or ``N x H x W x C``."""
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.ndim == 4:
            arr = arr.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"Images in '{name}' must be N x H x W or N x H x W x C, "
                            f"got shape {arr.shape}.")
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).float() / 255.0
        return cls(tensor, torch.as_tensor(np.asarray(labels).reshape(-1).astype(np.int64)),
                   tuple(class_names), name,
                   None if patient_ids is None else tuple(patient_ids))


@dataclass(frozen=True, eq=False)
class DataBundle:
    """The splits of one data source. ``val`` and ``test`` may be absent."""

    train: ImageDataset
    val: ImageDataset | None = None
    test: ImageDataset | None = None
    source: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in (self.val, self.test):
            if split is None:
                continue
            if split.image_shape != self.train.image_shape:
                raise DataError(
                    f"Split '{split.name}' of {self.source or 'the data'} has image shape "
                    f"{split.image_shape} but train has {self.train.image_shape}.")
            if split.class_names != self.train.class_names:
                raise DataError(
                    f"Split '{split.name}' of {self.source or 'the data'} has classes "
                    f"{list(split.class_names)} but train has {list(self.train.class_names)}.")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    def splits(self) -> dict[str, ImageDataset]:
        """The splits that are present, in train / val / test order."""
        present = {"train": self.train, "val": self.val, "test": self.test}
        return {k: v for k, v in present.items() if v is not None}
