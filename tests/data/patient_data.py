"""A MedMNIST-layout file whose test split shares patients with train, for the library and
command-line tests of patient leakage (tests/data is on sys.path for its test modules)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privmed.data import make_synthetic


def leaky_npz(path: Path, shared: int = 3, seed: int = 0) -> Path:
    """Synthetic patients whose test split reuses ``shared`` training patients' ids (also
    used by the command-line tests)."""
    bundle = make_synthetic(n_train=240, n_val=60, n_test=60, size=12, seed=seed,
                            images_per_patient=(1, 5))
    arrays = {}
    for split, ds in bundle.splits().items():
        arrays[f"{split}_images"] = ds.to_uint8()
        arrays[f"{split}_labels"] = ds.labels.numpy().reshape(-1, 1)
        arrays[f"{split}_patients"] = np.array(ds.patient_ids)
    train_names = list(dict.fromkeys(bundle.train.patient_ids))[:shared]
    rename = dict(zip(dict.fromkeys(bundle.test.patient_ids), train_names, strict=False))
    arrays["test_patients"] = np.array([rename.get(p, p) for p in bundle.test.patient_ids])
    np.savez(path, **arrays)
    return path
