"""Helpers shared by the folder and DICOM loaders (layout discovery, stacking, resizing)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privmed.data.dataset import SPLITS, DataBundle, ImageDataset
from privmed.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Folder names accepted for each split; PriMIA-style trees use train/val/test.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
PATIENT_PREFIX = "patient-"  # <class>/patient-<id>/<file>: the folder names the patient


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_patient_dir(folder: Path) -> bool:
    return folder.name.lower().startswith(PATIENT_PREFIX)


def _class_files(cls_dir: Path, accept: Callable[[Path], bool]) -> list[Path]:
    """Accepted files of a class folder and of its ``patient-<id>/`` folders (other
    sub-folders are ignored, as before patients were read)."""
    def files(folder: Path) -> list[Path]:
        return [p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and accept(p)]

    found = files(cls_dir)
    for sub in visible_dirs(cls_dir):
        if is_patient_dir(sub):
            found += files(sub)
    return sorted(found)


def folder_patients(root: Path, layout: dict[str, dict[str, list[Path]]]
                    ) -> dict[Path, str] | None:
    """Each file's patient from its ``patient-<id>/`` folder, or None when no file is in
    one. A layout with images both in and outside patient folders is refused: the loose
    images' patients would be unknown, and could be anyone already in another split."""
    files = [f for classes in layout.values() for fs in classes.values() for f in fs]
    inside = [f for f in files if is_patient_dir(f.parent)]
    if not inside:
        return None
    loose = [f for f in files if not is_patient_dir(f.parent)]
    if loose:
        raise DataError(f"Folder {root} has images both in patient-<id>/ folders (such as "
                        f"{inside[0].relative_to(root)}) and directly in class folders (such "
                        f"as {loose[0].relative_to(root)}); put every image in a patient "
                        "folder or none.")
    ids = {f: f.parent.name[len(PATIENT_PREFIX):].strip() for f in inside}
    unnamed = next((f for f, pid in ids.items() if not pid), None)
    if unnamed is not None:
        raise DataError(f"Folder {unnamed.parent} names no patient; call it "
                        f"{PATIENT_PREFIX}<id>.")
    return ids


def discover_layout(root: Path, accept: Callable[[Path], bool], what: str
                    ) -> dict[str, dict[str, list[Path]]]:
    """Map ``split -> class -> files`` for ``root/<class>/*`` or ``root/<split>/<class>/*``
    (files may sit one level deeper, in ``<class>/patient-<id>/``).

    A flat tree becomes the train split. Every class folder must hold at least one
    accepted file and every split must have the same classes.
    """
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist or is not a folder.")
    top = visible_dirs(root)
    split_dirs = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    if split_dirs:
        others = [d.name for d in top if d.name.lower() not in SPLIT_ALIASES]
        if others:
            raise DataError(f"Folder {root} mixes split folders (train/val/test) with other "
                            f"folders {others}; use one layout.")
        splits = {}
        for d in split_dirs:
            split = SPLIT_ALIASES[d.name.lower()]
            if split in splits:
                raise DataError(f"Folder {root} has two folders for the '{split}' split.")
            splits[split] = d
        if "train" not in splits:
            raise DataError(f"Folder {root} has split folders but no 'train' folder.")
    else:
        splits = {"train": root}

    layout: dict[str, dict[str, list[Path]]] = {}
    for split in SPLITS:
        if split not in splits:
            continue
        classes = visible_dirs(splits[split])
        if not classes:
            raise DataError(f"Folder {splits[split]} contains no class folders "
                            f"(expected <class>/ folders holding {what}).")
        layout[split] = {}
        for cls_dir in classes:
            files = _class_files(cls_dir, accept)
            if not files:
                raise DataError(f"Class folder {cls_dir} contains no {what}.")
            layout[split][cls_dir.name] = files
    train_classes = list(layout["train"])
    for split, classes in layout.items():
        if list(classes) != train_classes:
            raise DataError(f"Split '{split}' in {root} has classes {list(classes)} but train "
                            f"has {train_classes}; every split needs the same class folders.")
    return layout


def check_sizes(images: Sequence[np.ndarray], files: Sequence[Path]) -> None:
    """Raise if the images do not all share one height x width."""
    sizes = [im.shape[:2] for im in images]
    common, _ = Counter(sizes).most_common(1)[0]
    for size, path in zip(sizes, files, strict=True):
        if size != common:
            raise DataError(
                f"Image {path} is {size[1]}x{size[0]} pixels but most images are "
                f"{common[1]}x{common[0]}; pass --size N (size=N) to resize all images.")


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an 8-bit ``H x W`` or ``H x W x 3`` image to ``size x size`` (antialiased)."""
    if image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))


def stack_uint8(images: list[np.ndarray], files: Sequence[Path]) -> np.ndarray:
    """Stack 8-bit images; if any is colour, grey ones are repeated to 3 channels."""
    check_sizes(images, files)
    if any(im.ndim == 3 for im in images):
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    return np.stack(images)


def build_bundle(layout: dict[str, dict[str, list[Path]]], read: Callable[[Path], np.ndarray],
                 size: int | None, source: str, info: dict,
                 patient_of: Callable[[Path], str] | None = None) -> DataBundle:
    """Read every file of ``layout`` with ``read`` (-> uint8 image) into a DataBundle.

    ``patient_of(path)``, called after ``read(path)``, names each image's patient."""
    class_names = tuple(next(iter(layout.values())))
    flat: list[tuple[str, int, Path]] = [
        (split, label, path)
        for split, classes in layout.items()
        for label, files in enumerate(classes.values())
        for path in files
    ]
    images, patients = [], []
    for _, _, path in flat:
        image = read(path)
        images.append(resize_uint8(image, size) if size else image)
        if patient_of is not None:
            patients.append(patient_of(path))
    # Stack all splits together so grey/colour and size checks see every file.
    arr = stack_uint8(images, [p for _, _, p in flat])
    splits_arr = np.array([s for s, _, _ in flat])
    labels = np.array([lab for _, lab, _ in flat], dtype=np.int64)
    name = Path(source).name or "data"
    ids = np.array(patients, dtype=object) if patient_of is not None else None
    datasets = {
        split: ImageDataset.from_uint8(arr[splits_arr == split], labels[splits_arr == split],
                                       class_names, f"{name}/{split}",
                                       None if ids is None else ids[splits_arr == split])
        for split in layout
    }
    counts = {split: sum(len(f) for f in classes.values()) for split, classes in layout.items()}
    return DataBundle(datasets["train"], datasets.get("val"), datasets.get("test"),
                      source=source, info={**info, "files": counts})


def resize_dataset(ds: ImageDataset, size: int) -> ImageDataset:
    """Resize all images of ``ds`` to ``size x size`` (bilinear, antialiased), re-quantised
    to 8 bit so the result round-trips through ``save_npz`` unchanged."""
    if ds.image_shape[1:] == (size, size):
        return ds
    out = torch.nn.functional.interpolate(ds.images, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    out = (out.clamp(0, 1) * 255.0).round() / 255.0
    return ImageDataset(out, ds.labels, ds.class_names, ds.name, ds.patient_ids)


def resize_bundle(bundle: DataBundle, size: int) -> DataBundle:
    parts = {k: resize_dataset(v, size) for k, v in bundle.splits().items()}
    return DataBundle(parts["train"], parts.get("val"), parts.get("test"), bundle.source,
                      {**bundle.info, "resized_to": size})
