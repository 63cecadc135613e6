"""MedMNIST ``.npz`` files: load, save (same layout) and fetch the official release.

Layout (MedMNIST v2/v3): ``{train,val,test}_images`` uint8 ``N x H x W`` (grey) or
``N x H x W x 3`` (RGB) and ``{split}_labels`` ``N x 1``. Files written by privmed add
a ``class_names`` key, and ``{split}_patients`` (one id per image, strings or integers)
when the patients are known, so everything privmed writes re-loads with the same loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from privmed.data.dataset import SPLITS, DataBundle, ImageDataset
from privmed.errors import ConfigError, DataError, NetworkError

# URLs and MD5s copied verbatim from medmnist/info.py of MedMNIST/MedMNIST (medmnist 3.0.2,
# Zenodo record 10519652): "url"/"MD5" (28 px) and "url_64"/"MD5_64" etc.
_ZENODO = "https://zenodo.org/records/10519652/files"
KNOWN_DATASETS: dict[str, dict] = {
    "pneumoniamnist": {
        "class_names": ("normal", "pneumonia"),
        "md5": {
            28: "28209eda62fecd6e6a2d98b1501bb15f",
            64: "8f4eceb4ccffa70c672198ea285246c6",
            128: "05b46931834c231683c68f40c47b2971",
            224: "d6a3c71de1b945ea11211b03746c1fe1",
        },
    },
}
MIRROR_ENV = "PRIVMED_MEDMNIST_MIRROR"  # base URL replacing the Zenodo record (mirrors, tests)
CACHE_ENV = "PRIVMED_CACHE"


def _bad(path: Path, why: str) -> DataError:
    return DataError(f"MedMNIST file {path} {why}.")


def _known_class_names(path: Path) -> tuple[str, ...] | None:
    stem = path.name.lower()
    for name, meta in KNOWN_DATASETS.items():
        if stem.startswith(name):
            return meta["class_names"]
    return None


def _read_images(path: Path, key: str, arr: np.ndarray) -> torch.Tensor:
    """Images ``N x H x W [x C]`` (any numeric dtype) -> float ``N x C x H x W`` in [0, 1]."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise _bad(path, f"has '{key}' of shape {arr.shape}, expected N x H x W or N x H x W x 3")
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr)).float() / 255.0
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise _bad(path, f"has '{key}' of unsupported dtype {arr.dtype}")
    values = arr.astype(np.float32)
    if not np.isfinite(values).all():
        raise _bad(path, f"has NaN or infinite values in '{key}'")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi > 255:
        raise _bad(path, f"has '{key}' values in [{lo:g}, {hi:g}], expected [0, 1] or [0, 255]")
    # Floats already in [0, 1] are taken as scaled; anything larger as 8-bit levels.
    scale = 1.0 if np.issubdtype(arr.dtype, np.floating) and hi <= 1.0 else 255.0
    return torch.from_numpy(np.ascontiguousarray(values)) / scale


def _read_labels(path: Path, key: str, arr: np.ndarray, n: int) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise _bad(path, f"has multi-label '{key}' ({arr.shape[1]} columns), which privmed "
                         "does not support")
    labels = arr.reshape(-1)
    if labels.shape[0] != n:
        raise _bad(path, f"has {n} images but {labels.shape[0]} labels in '{key}'")
    if not np.issubdtype(labels.dtype, np.number) or np.iscomplexobj(labels):
        raise _bad(path, f"has '{key}' of unsupported dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all():
            raise _bad(path, f"has NaN or infinite values in '{key}'")
        if not np.all(labels == np.round(labels)):
            raise _bad(path, f"has non-integer class labels in '{key}'")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise _bad(path, f"has negative label {int(labels.min())} in '{key}'")
    return labels


def _read_patients(path: Path, key: str, arr: np.ndarray, n: int) -> tuple[str, ...]:
    """``N`` (or ``N x 1``) patient ids, strings or integers -> one string per image."""
    if arr.ndim > 2 or (arr.ndim == 2 and arr.shape[1] != 1):
        raise _bad(path, f"has '{key}' of shape {arr.shape}, expected one patient id per image")
    ids = arr.reshape(-1)
    if ids.shape[0] != n:
        raise _bad(path, f"has {n} images but {ids.shape[0]} patient ids in '{key}'")
    if ids.dtype.kind == "S":  # bytes, as some writers store strings
        try:
            return tuple(b.decode("utf-8") for b in ids.tolist())
        except UnicodeDecodeError as exc:
            raise _bad(path, f"has patient ids in '{key}' that are not UTF-8 text") from exc
    if ids.dtype.kind not in "Uiu":  # floats would turn 17 into '17.0'; bools are no ids
        raise _bad(path, f"has '{key}' of dtype {ids.dtype}, but patient ids must be "
                         "strings or integers")
    return tuple(str(p) for p in ids.tolist())


def load_medmnist_npz(path: str | Path, class_names: Sequence[str] | None = None) -> DataBundle:
    """Load an official (or privmed-written) MedMNIST ``.npz`` file into a DataBundle."""
    path = Path(path).expanduser()
    datasets = read_npz_splits(path, class_names)
    if "train" not in datasets:
        held = " and ".join(f"'{s}'" for s in datasets)
        raise DataError(f"{path} holds only the {held} split, no training images "
                        "(train_images): evaluate "
                        f"a model on it (privmed evaluate RUN --data {path}) or give it to a "
                        "coordinator (--heldout).")
    return DataBundle(datasets["train"], datasets.get("val"), datasets.get("test"),
                      source=str(path), info={"format": "medmnist-npz"})


def read_npz_splits(path: str | Path, class_names: Sequence[str] | None = None
                    ) -> dict[str, ImageDataset]:
    """Every split a MedMNIST-layout ``.npz`` file holds (at least one), by name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"MedMNIST file {path} does not exist.")
    arrays: dict[str, np.ndarray] = {}
    try:
        # Open the file ourselves: np.load leaks its handle when the archive is corrupt.
        with path.open("rb") as fh:
            loaded = np.load(fh, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise _bad(path, "holds a single array, not an .npz archive of named arrays")
            with loaded as npz:
                for key in npz.files:
                    arrays[key] = np.asarray(npz[key])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _bad(path, f"cannot be read as an .npz archive ({type(exc).__name__}: "
                         "corrupt or truncated?)") from exc
    if not any(f"{split}_images" in arrays or f"{split}_labels" in arrays for split in SPLITS):
        raise _bad(path, "lacks the keys 'train_images' and 'train_labels' (or another "
                         f"split's; found {sorted(arrays)})")

    parsed: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    patients: dict[str, tuple[str, ...]] = {}
    for split in SPLITS:
        ik, lk, pk = f"{split}_images", f"{split}_labels", f"{split}_patients"
        if ik not in arrays and lk not in arrays:
            if pk in arrays:
                raise _bad(path, f"has '{pk}' but no '{ik}'")
            continue
        if ik not in arrays or lk not in arrays:
            raise _bad(path, f"has only one of '{ik}' and '{lk}'")
        images = _read_images(path, ik, arrays[ik])
        if images.shape[0] == 0:
            raise _bad(path, f"has no images in '{ik}'")
        parsed[split] = (images, _read_labels(path, lk, arrays[lk], images.shape[0]))
        if pk in arrays:
            patients[split] = _read_patients(path, pk, arrays[pk], images.shape[0])

    max_label = max(int(labels.max()) for _, labels in parsed.values())
    if class_names is None and "class_names" in arrays:
        class_names = [str(c) for c in np.asarray(arrays["class_names"]).reshape(-1)]
    if class_names is None:
        class_names = _known_class_names(path)
    if class_names is None:
        class_names = [f"class_{i}" for i in range(max(max_label + 1, 2))]
    class_names = tuple(str(c) for c in class_names)
    if max_label >= len(class_names):
        raise _bad(path, f"has label {max_label} but only {len(class_names)} classes "
                         f"{list(class_names)}")

    return {
        split: ImageDataset(images, torch.from_numpy(labels), class_names,
                            f"{path.stem}/{split}", patients.get(split))
        for split, (images, labels) in parsed.items()
    }


def save_npz(bundle: DataBundle, path: str | Path) -> Path:
    """Write ``bundle`` in MedMNIST layout (uint8 images, ``N x 1`` labels, ``class_names``,
    and ``{split}_patients`` for every split whose patients are known).

    The file is written to a temporary name and renamed, so a crash never leaves a
    half-written archive under ``path``.
    """
    return _write_npz(bundle.splits(), path)


def save_split_npz(dataset: ImageDataset, path: str | Path, split: str = "test") -> Path:
    """Write one split alone (e.g. the held-out ``test`` split a coordinator evaluates on),
    under that split's keys, so nobody mistakes it for training data."""
    if split not in SPLITS:
        raise ConfigError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    return _write_npz({split: dataset}, path)


def _write_npz(splits: dict[str, ImageDataset], path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(splits.values()))
    label_dtype = np.uint8 if first.num_classes <= 256 else np.int64
    arrays: dict[str, np.ndarray] = {"class_names": np.array(first.class_names, dtype=str)}
    for split, ds in splits.items():
        arrays[f"{split}_images"] = ds.to_uint8()
        arrays[f"{split}_labels"] = ds.labels.numpy().astype(label_dtype).reshape(-1, 1)
        if ds.patient_ids is not None:  # unicode array: loads back without pickle
            arrays[f"{split}_patients"] = np.array(ds.patient_ids, dtype=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------- download


def default_cache_dir() -> Path:
    """``$PRIVMED_CACHE`` if set, else ``~/.cache/privmed``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "privmed"


def medmnist_filename(name: str, size: int = 28) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _check_known(name: str, size: int) -> str:
    meta = KNOWN_DATASETS.get(name)
    if meta is None:
        raise ConfigError(f"Unknown MedMNIST dataset '{name}'; privmed knows "
                          f"{sorted(KNOWN_DATASETS)}.")
    if size not in meta["md5"]:
        raise ConfigError(f"MedMNIST '{name}' is published at sizes {sorted(meta['md5'])}, "
                          f"not {size}.")
    return meta["md5"][size]


def cached_medmnist_path(name: str, size: int = 28, cache_dir: str | Path | None = None
                         ) -> Path:
    """Where :func:`fetch_medmnist` stores ``name`` (whether or not it is there yet)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "medmnist" / medmnist_filename(name, size)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, label: str, progress: bool, timeout: float) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=True, disable=not progress)
        with bar:
            task = bar.add_task(f"Downloading {label}", total=total)
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                bar.advance(task, len(chunk))


def fetch_medmnist(name: str = "pneumoniamnist", size: int = 28,
                   cache_dir: str | Path | None = None, *, url: str | None = None,
                   md5: str | None = None, progress: bool = True, timeout: float = 30.0
                   ) -> Path:
    """Download the official MedMNIST file into the cache (MD5-checked) and return its path.

    Returns at once when the cached file already has the right MD5. ``url`` overrides the
    Zenodo address (as does ``$PRIVMED_MEDMNIST_MIRROR``, a base URL the file name is
    appended to); ``md5`` overrides the published checksum (for private mirrors / tests).
    """
    name = name.lower()
    expected = md5 or _check_known(name, size)
    filename = medmnist_filename(name, size)
    dest = cached_medmnist_path(name, size, cache_dir)
    if dest.is_file() and _md5(dest) == expected:
        return dest
    if url is None:
        base = os.environ.get(MIRROR_ENV, _ZENODO).rstrip("/")
        url = f"{base}/{filename}" + ("?download=1" if base == _ZENODO else "")
    host = urllib.parse.urlsplit(url).hostname or url
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Cannot create the cache folder {dest.parent} ({exc.strerror}); "
                        f"set {CACHE_ENV} to a writable folder.") from exc
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{filename}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _download(url, tmp, filename, progress, timeout)
        except urllib.error.HTTPError as exc:
            raise NetworkError(f"Could not download {name} from {host} (HTTP {exc.code}); "
                               f"download {url} by hand to {dest}.") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise NetworkError(f"Could not download {name} from {host} (no network?); "
                               f"download {url} by hand to {dest}.") from exc
        got = _md5(tmp)
        if got != expected:
            raise DataError(f"Downloaded {filename} from {host} has MD5 {got} but {expected} "
                            "was expected, so it was deleted; try again or check the mirror.")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return dest
