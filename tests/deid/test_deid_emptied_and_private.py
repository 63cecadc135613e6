"""What the audit log says is what the file holds (Z = zero length, dates included), and the
log that maps original names to outputs is readable by its owner only."""

from __future__ import annotations

import csv
import stat
from pathlib import Path

import numpy as np
import pydicom

from privmed.deid import Salt, deidentify_folder
from privmed.deid.profile import table_action
from privmed.deid.samples import fake_patients, phi_dataset


def _one_file(root: Path) -> None:
    p = fake_patients(1)[0]
    ds = phi_dataset(p, np.arange(64, dtype=np.uint16).reshape(8, 8))
    path = root / "cls" / f"{p.family}_{p.mrn}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_emptied_dates_are_zero_length_and_the_log_says_what_was_written(tmp_path: Path):
    _one_file(tmp_path / "in")
    report = deidentify_folder(tmp_path / "in", tmp_path / "out", Salt(b"\x07" * 32))
    (out_file,) = (tmp_path / "out").rglob("*.dcm")
    out = pydicom.dcmread(out_file)
    with report.log_path.open(newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    logged = dict(item.split(":") for item in row["changed"].split(";"))
    # Study Date/Time and Patient's Birth Date are Z (Type 2): truly empty, not 00010101.
    for keyword in ("StudyDate", "StudyTime", "PatientBirthDate"):
        assert table_action(pydicom.datadict.tag_for_keyword(keyword)) == "Z"
        assert logged[keyword] == "emptied"
        assert out.data_element(keyword).is_empty, f"{keyword} = {out.get(keyword)!r}"
    # Content Date is Z/D (Type 1 in some IODs): a dummy, and logged as one.
    assert logged["ContentDate"] == "dummy" and out.ContentDate == "00010101"
    # Every attribute logged as emptied is zero length in the written file.
    emptied = [k for k, v in logged.items() if v == "emptied"]
    assert len(emptied) >= 10
    for keyword in emptied:
        elem = out.get(keyword)
        if elem is not None and not isinstance(elem, pydicom.Sequence):
            assert out.data_element(keyword).is_empty, f"{keyword} = {elem!r}"
    assert not any(v == "00010101" for k, v in ((k, str(out.get(k, ""))) for k in emptied))


def test_the_audit_log_is_readable_by_its_owner_only(tmp_path: Path):
    _one_file(tmp_path / "in")
    log = tmp_path / "log.csv"
    log.write_text("an older, world-readable log\n")
    log.chmod(0o644)
    deidentify_folder(tmp_path / "in", tmp_path / "out", Salt(b"\x07" * 32), log_path=log)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert log.read_text().startswith("source,output,status")
