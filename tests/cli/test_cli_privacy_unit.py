"""`privmed train --privacy-unit`: per patient by default when the data names its patients,
a one-sentence refusal when it asks for patients the data does not name."""

from __future__ import annotations

import json

from cli_run import assert_one_sentence_error, privmed


def test_train_is_per_patient_on_data_with_patients_and_refuses_patients_without_ids(tmp_path):
    proc = privmed("train", "--data", "synthetic", "--privacy-unit", "patient", "--epochs", "1",
                   "--out", str(tmp_path / "refused"))
    assert_one_sentence_error(proc, 2, "needs the patient of every training image")
    assert not (tmp_path / "refused" / "results.json").exists()

    proc = privmed("train", "--data", "synthetic-patients", "--epochs", "1", "--batch-size",
                   "256", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    p = results["privacy"]
    assert p["unit"] == "patient" and p["units"] == results["data"]["patients"]["train"]
    assert f"per patient ({p['units']} patients, up to" in proc.stdout

    proc = privmed("train", "--data", "synthetic-patients", "--privacy-unit", "image",
                   "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path / "image"))
    assert proc.returncode == 0, proc.stderr
    assert "ε is per image" in proc.stdout
