"""A DICOM run with repeated Patient IDs: whole patients in validation, the privacy unit
and group privacy in results.json, the full-batch and δ warnings, private files; the
Python FitResult's delta; a user's network whose class cannot be imported."""

from __future__ import annotations

import stat
import sys
import types
from pathlib import Path

import pytest
import torch
from dicom_folder import patient_folder

from privmed.data import load_data
from privmed.errors import DataError
from privmed.models import load_user_model
from privmed.privacy import PrivacyConfig
from privmed.privacy.group import group_privacy
from privmed.training import TrainConfig
from privmed.training.checkpoint import save_checkpoint
from privmed.training.run import train_run

COUNTS = [1, 2, 3, 5] * 6  # 66 images of 24 patients, up to 5 each


@pytest.fixture(scope="module")
def dicom_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcm")
    patient_folder(root, COUNTS, size=16)
    return load_data(root, seed=0)


def test_a_small_dicom_run_states_unit_patients_and_its_warnings(dicom_bundle, tmp_path):
    said: list[str] = []
    n = len(dicom_bundle.train)
    results = train_run(dicom_bundle, tmp_path / "run", config=TrainConfig(epochs=1),
                        privacy=PrivacyConfig(target_epsilon=2.0, delta=1.0 / (2 * n),
                                              unit="image"),
                        progress=False, say=said.append, positive_class="opacity")
    p, data = results["privacy"], results["data"]
    # whole patients in validation, and the data says so
    assert data["patients"]["val_by_patient"] and data["patients"]["val_shares_with_train"] == 0
    assert data["patients"]["max_images_per_patient"] == 5
    # the unit, and group privacy computed from the run's own (ε, δ)
    assert p["unit"] == "image"
    rows = {r["images"]: r for r in p["group_privacy"]}
    assert set(rows) == {2, 5, 10} and rows[5]["largest_patient"]
    assert (rows[2]["epsilon"], rows[2]["delta"]) == pytest.approx(
        group_privacy(p["epsilon"], p["delta"], 2))
    # fewer images than --batch-size 1024: q = 1, said in the console and in results
    assert p["sample_rate"] == 1.0
    full = [w for w in p["warnings"] if "sample rate q = 1" in w]
    assert full and "no privacy amplification by subsampling" in full[0]
    assert any(w.startswith("δ = ") and "not well below 1/N" in w for w in p["warnings"])
    assert [f"Warning: {w}" for w in p["warnings"]] == [s for s in said if s.startswith("Warn")]
    # weights are readable by their owner only
    assert stat.S_IMODE((tmp_path / "run" / "model.pt").stat().st_mode) == 0o600
    assert "Privacy unit: one image." in (tmp_path / "run" / "report.html").read_text()


def test_a_run_on_data_that_names_its_patients_is_per_patient_by_default(dicom_bundle,
                                                                           tmp_path):
    results = train_run(dicom_bundle, tmp_path / "run", config=TrainConfig(epochs=1),
                        privacy=PrivacyConfig(target_epsilon=2.0), progress=False,
                        say=lambda s: None, positive_class="opacity")
    p = results["privacy"]
    assert (p["unit"], p["units"]) == ("patient", dicom_bundle.train.num_patients)
    assert p["max_images_per_unit"] == 5 and p["group_privacy"] == []
    assert p["delta"] < 1 / dicom_bundle.train.num_patients
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Privacy unit: one patient." in report
    assert f"{dicom_bundle.train.num_patients} patients, up to 5 images each" in report


def test_no_warning_for_sensible_settings(dicom_bundle, tmp_path):
    results = train_run(dicom_bundle, tmp_path / "run",
                        config=TrainConfig(epochs=1, batch_size=8), progress=False,
                        privacy=PrivacyConfig(target_epsilon=2.0), say=lambda s: None,
                        positive_class="opacity")
    assert results["privacy"]["warnings"] == [] and results["privacy"]["sample_rate"] < 1


def test_checkpoints_are_private_even_over_an_old_world_readable_one(tmp_path):
    old = tmp_path / "checkpoint.pt"
    old.write_bytes(b"old")
    old.chmod(0o644)
    path = save_checkpoint(tmp_path, {"epoch": 1, "w": torch.zeros(2)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*tmp"))


def test_fit_result_has_delta(dicom_bundle):
    from privmed.models import create_model
    from privmed.training import fit

    model = create_model("small-cnn", 1, 2, width=8)
    dp = fit(model, dicom_bundle.train, None, TrainConfig(epochs=1, batch_size=16),
             PrivacyConfig(target_epsilon=3.0, delta=1e-3))
    assert dp.delta == 1e-3 and dp.epsilon is not None
    plain = fit(create_model("small-cnn", 1, 2, width=8), dicom_bundle.train, None,
                TrainConfig(epochs=1, batch_size=16), None)
    assert plain.delta is None and plain.epsilon is None


def _save_unimportable(tmp_path: Path, module_name: str) -> Path:
    """torch.save a network whose class lives in ``module_name``, then make that module
    unimportable, as when a user saves from their own script."""
    module = types.ModuleType(module_name)
    exec("from torch import nn\nclass MyNet(nn.Module):\n    def __init__(self):\n"
         "        super().__init__(); self.fc = nn.Linear(4, 2)\n", module.__dict__)
    module.MyNet.__module__ = module_name
    main = sys.modules["__main__"]
    if module_name == "__main__":
        main.MyNet = module.MyNet
    else:
        sys.modules[module_name] = module
    try:
        path = tmp_path / f"{module_name.strip('_')}.pt"
        torch.save(module.MyNet(), path)
    finally:
        if module_name == "__main__":
            del main.MyNet
        else:
            del sys.modules[module_name]
    return path


@pytest.mark.parametrize("module_name", ["__main__", "my_private_nets"])
def test_an_unimportable_model_class_is_named_with_the_fix(tmp_path, module_name):
    path = _save_unimportable(tmp_path, module_name)
    with pytest.raises(DataError) as err:
        load_user_model(path)
    message = str(err.value)
    assert "Error" not in message  # not "(AttributeError)" or "(ModuleNotFoundError)"
    if module_name == "__main__":
        assert "class MyNet" in message and "script that saved it" in message
    else:
        assert "module 'my_private_nets'" in message
    assert "module file" in message and "PYTHONPATH" in message
