"""``privmed deid dicom`` as a user runs it: a real subprocess on generated PHI files."""

from __future__ import annotations

import csv
import stat
from pathlib import Path

import numpy as np
import pydicom
from cli_run import assert_one_sentence_error, privmed

from privmed.deid.samples import write_phi_folder


def _folder(root: Path, burned_in_every: int = 0) -> list:
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    return write_phi_folder(root, images, np.array([0, 1, 0, 1]), ["normal", "pneumonia"],
                            burned_in_every=burned_in_every)


def test_clean_folder_exits_zero_creates_a_private_salt_and_logs_every_file(
        tmp_path: Path) -> None:
    patients = _folder(tmp_path / "in")
    salt = tmp_path / "keys" / "site.salt"
    proc = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                   "--salt-file", str(salt), "--shift-dates")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Created a new salt" in proc.stdout and "deidentified │ 4" in proc.stdout
    assert stat.S_IMODE(salt.stat().st_mode) == 0o600
    assert salt.read_text().strip() not in proc.stdout + proc.stderr  # secrets never printed
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(outputs) == 4
    assert pydicom.dcmread(outputs[0]).PatientIdentityRemoved == "YES"
    with open(tmp_path / "out-deid-log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["deidentified"] * 4
    assert all(int(r["shifted"]) > 0 and int(r["removed"]) > 0 for r in rows)
    # The log names attributes and actions, never their values.
    text = (tmp_path / "out-deid-log.csv").read_text()
    for p in patients:
        assert p.birth_date not in text and p.address not in text and p.phone not in text

    again = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                    "--salt-file", str(salt), "--shift-dates")
    assert again.returncode == 0 and "Created a new salt" not in again.stdout
    assert sorted((tmp_path / "out").rglob("*.dcm")) == outputs  # same salt, same names


def test_burned_in_file_is_refused_listed_and_exits_non_zero(tmp_path: Path) -> None:
    _folder(tmp_path / "in", burned_in_every=2)
    proc = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                   "--salt-file", str(tmp_path / "salt"))
    assert_one_sentence_error(proc, 1, "2 of 4 files were not de-identified",
                              "2 refused for burned-in text")
    assert "Burned In Annotation is YES" in proc.stdout
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2

    blanked = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out2"),
                      "--salt-file", str(tmp_path / "salt"), "--blank-region", "0,0,16,3")
    assert blanked.returncode == 0, blanked.stderr
    assert "blanked      │ 2" in blanked.stdout


def test_bad_requests_end_in_one_sentence(tmp_path: Path) -> None:
    _folder(tmp_path / "in")
    salt = str(tmp_path / "salt")
    inside = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "in" / "out"),
                     "--salt-file", salt)
    assert_one_sentence_error(inside, 2, "must lie outside")
    assert not (tmp_path / "salt").exists()  # refused before anything was created

    secret_in_out = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                            "--salt-file", str(tmp_path / "out" / "salt"))
    assert_one_sentence_error(secret_in_out, 2, "must not lie inside the output folder")

    region = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                     "--salt-file", salt, "--blank-region", "5,5,2,9")
    assert_one_sentence_error(region, 2, "Blank region")

    (tmp_path / "bad.salt").write_text("not hex at all")
    bad_salt = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                       "--salt-file", str(tmp_path / "bad.salt"))
    assert_one_sentence_error(bad_salt, 2, "cannot be read as a hex secret")

    missing = privmed("deid", "dicom", str(tmp_path / "nowhere"), str(tmp_path / "out"),
                      "--salt-file", salt)
    assert_one_sentence_error(missing, 2, "does not exist")

    (tmp_path / "empty").mkdir()
    empty = privmed("deid", "dicom", str(tmp_path / "empty"), str(tmp_path / "out"),
                    "--salt-file", salt)
    assert_one_sentence_error(empty, 2, "holds no files")
    assert not (tmp_path / "salt").exists()
