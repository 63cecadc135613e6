"""DICOM de-identification on generated files with fake PHI in every Table E.1-1 attribute."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sequence import Sequence
from pydicom.uid import UID

from privmed.data.dicom import load_dicom, read_dicom
from privmed.deid import ProfileOptions, Region, Salt, deidentify_folder
from privmed.deid.profile import TABLE, is_well_known_uid
from privmed.deid.samples import fake_patients, header_bytes, phi_dataset, write_phi_folder

# What privmed's Z and D actions may leave, per the VR (Kitware's empty/dummy values).
EMPTY = {"", b"", 0, "0", "00010101", "000000.00", "00010101010101.000000+0000"}
DUMMY = EMPTY | {"ANONYMIZED", "000Y", b"Anonymized", "http://anonymized.invalid"}


def _images(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (n, size, size), dtype=np.uint16)


def _value(elem: pydicom.DataElement) -> object:
    value = elem.value
    if isinstance(value, Sequence):
        return "SQ" if len(value) == 0 else value
    return value if isinstance(value, bytes | int | float) else str(value)


def _salt(byte: int = 7) -> Salt:
    return Salt(bytes([byte]) * 32)


def _write_one(root: Path, patient_index: int = 0, **kw) -> tuple[Path, pydicom.Dataset]:
    p = fake_patients(patient_index + 1)[patient_index]
    ds = phi_dataset(p, _images(1)[0], **kw)
    path = root / "cls" / f"{p.family}_{p.mrn}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path, pydicom.dcmread(path)


def _only_output(out: Path) -> pydicom.Dataset:
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 1, files
    return pydicom.dcmread(files[0])


def test_every_profile_attribute_gets_its_action(tmp_path: Path) -> None:
    src, original = _write_one(tmp_path / "in")
    report = deidentify_folder(tmp_path / "in", tmp_path / "out", _salt())
    assert [r.status for r in report.results] == ["deidentified"]
    out = _only_output(tmp_path / "out")
    salt = _salt()
    checked = 0
    for tag, action in TABLE.items():
        if tag >> 16 in (0x0000, 0x0002) or tag not in original:
            continue
        before = original[tag]
        if before.keyword == "PatientID":
            assert out.PatientID == salt.patient_pseudonym(str(before.value))
        elif action == "X":
            assert tag not in out, f"{before.keyword or hex(tag)} should be removed"
        elif before.VR == "UI" and action in ("U", "D"):
            assert out[tag].value == salt.uid(str(before.value)) != before.value
            assert UID(out[tag].value).is_valid
        elif action == "U*":  # a reference sequence: kept, its UIDs keyed, its PHI cleaned
            item, orig_item = out[tag].value[0], before.value[0]
            assert item.ReferencedSOPInstanceUID == salt.uid(orig_item.ReferencedSOPInstanceUID)
            assert item.PatientName == "" and item.PatientID == "ANONYMIZED"
        else:
            after = _value(out[tag])
            allowed = EMPTY | {"SQ"} if action == "Z" else DUMMY | {"SQ"}
            assert after in allowed, f"{before.keyword or hex(tag)} ({action}) left {after!r}"
        checked += 1
    assert checked >= 600  # every attribute pydicom can write was generated and checked
    # Sequences the table does not list are kept, and the table applies inside them.
    equipment = out.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "ACME" and equipment.InstitutionName == "ANONYMIZED"
    assert str(equipment.OperatorsName) in DUMMY
    step = out.ScheduledProcedureStepSequence[0]
    assert str(step.get("ScheduledPerformingPhysicianName", "")) in DUMMY
    assert not any(elem.tag.is_private for elem in out.iterall())
    assert out.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    # Pixels untouched, readable by pydicom and by privmed's own DICOM loader.
    assert out.PixelData == original.PixelData
    out_file = next((tmp_path / "out").rglob("*.dcm"))
    np.testing.assert_array_equal(read_dicom(out_file), read_dicom(src))


def test_no_phi_or_original_uid_survives_anywhere_in_the_bytes(tmp_path: Path) -> None:
    patients = write_phi_folder(tmp_path / "in", _images(6), np.array([0, 1] * 3),
                                ["normal", "pneumonia"], images_per_patient=2)
    originals = [pydicom.dcmread(p) for p in sorted((tmp_path / "in").rglob("*.dcm"))]
    old_uids = {str(e.value) for ds in originals for e in ds.iterall()
                if e.VR == "UI" and not is_well_known_uid(str(e.value))}
    report = deidentify_folder(tmp_path / "in", tmp_path / "out", _salt())
    assert report.counts["deidentified"] == 6
    blob = b"".join(header_bytes(p) for p in (tmp_path / "out").rglob("*.dcm"))
    names = " ".join(str(p) for p in (tmp_path / "out").rglob("*"))
    for p in patients:
        for phi in p.phi_strings():
            assert phi.encode() not in blob and phi not in names, phi
    for uid in old_uids:
        assert uid.encode() not in blob
    bundle = load_dicom(tmp_path / "out")  # class folders survive as labels
    assert len(bundle.train) == 6 and bundle.class_names == ("normal", "pneumonia")


def test_uids_consistent_within_a_study_and_across_runs_with_the_same_salt(
        tmp_path: Path) -> None:
    write_phi_folder(tmp_path / "in", _images(4), np.zeros(4, int), ["a"], images_per_patient=2)
    deidentify_folder(tmp_path / "in", tmp_path / "out1", _salt(1))
    deidentify_folder(tmp_path / "in", tmp_path / "out2", _salt(1))
    deidentify_folder(tmp_path / "in", tmp_path / "out3", _salt(2))

    def read(out: str) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted((tmp_path / out).rglob("*.dcm"))]

    one, two, three = read("out1"), read("out2"), read("out3")
    studies = {ds.PatientID: set() for ds in one}
    for ds in one:
        studies[ds.PatientID].add(ds.StudyInstanceUID)
    assert len(studies) == 2 and all(len(s) == 1 for s in studies.values())
    assert len({ds.SOPInstanceUID for ds in one}) == 4
    # Same salt: byte-identical outputs; another salt: nothing in common.
    assert [p.read_bytes() for p in sorted((tmp_path / "out1").rglob("*.dcm"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "out2").rglob("*.dcm"))]
    assert {d.StudyInstanceUID for d in one}.isdisjoint({d.StudyInstanceUID for d in three})
    assert {d.PatientID for d in one}.isdisjoint({d.PatientID for d in three})
    assert len(two) == 4


def test_shift_dates_moves_each_patients_dates_by_one_keyed_offset(tmp_path: Path) -> None:
    patients = write_phi_folder(tmp_path / "in", _images(8), np.zeros(8, int), ["a"],
                                images_per_patient=2)
    salt = _salt()
    report = deidentify_folder(tmp_path / "in", tmp_path / "out", salt,
                               options=ProfileOptions(shift_dates=True))
    assert report.counts["deidentified"] == 8
    by_pseudonym = {salt.patient_pseudonym(p.mrn): p for p in patients}
    offsets = set()
    for path in (tmp_path / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        p = by_pseudonym[ds.PatientID]
        days = salt.date_shift_days(p.mrn)
        want = dt.datetime.strptime(p.study_date, "%Y%m%d").date() - dt.timedelta(days=days)
        for keyword in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
            assert ds.data_element(keyword).value == want.strftime("%Y%m%d")
        assert 1 <= days <= 3650
        offsets.add(days)
        assert ds.StudyTime == "103000"  # times of day are kept with shifted dates
        assert ds.get("PatientBirthDate") in (None, "", "00010101")
        assert "113107" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert len(offsets) == 4  # four patients, four different shifts


def test_patient_characteristics_only_with_the_option(tmp_path: Path) -> None:
    _write_one(tmp_path / "in")
    deidentify_folder(tmp_path / "in", tmp_path / "basic", _salt())
    deidentify_folder(tmp_path / "in", tmp_path / "kept", _salt(),
                      options=ProfileOptions(keep_patient_characteristics=True))
    basic, kept = _only_output(tmp_path / "basic"), _only_output(tmp_path / "kept")
    assert "PatientAge" not in basic and basic.PatientSex == ""
    assert kept.PatientAge == "047Y" and kept.PatientSex == "F"
    assert "113108" in [c.CodeValue for c in kept.DeidentificationMethodCodeSequence]


def test_burned_in_files_are_refused_or_blanked_and_always_listed(tmp_path: Path) -> None:
    _write_one(tmp_path / "in", 0, burned_in="YES")
    _write_one(tmp_path / "in", 1, burned_in=None)  # says nothing about burned-in text
    report = deidentify_folder(tmp_path / "in", tmp_path / "out", _salt())
    status = {r.source.split("/")[1].split("_")[0]: r for r in report.results}
    flagged, silent = (status[p.family] for p in fake_patients(2))
    assert flagged.status == "refused" and "Burned In Annotation" in flagged.reason
    assert silent.status == "deidentified" and silent.burned_in == "unknown"
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1
    with open(report.log_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["status"] for r in rows) == ["deidentified", "refused"]

    strict = deidentify_folder(tmp_path / "in", tmp_path / "strict", _salt(),
                               assume_burned_in=True)
    assert strict.counts["refused"] == 2

    region = Region(2, 3, 10, 6)
    blanked = deidentify_folder(tmp_path / "in", tmp_path / "blank", _salt(), blank=region)
    assert blanked.counts == {"blanked": 1, "deidentified": 1}
    src = pydicom.dcmread(next(p for p in (tmp_path / "in").rglob("*.dcm")
                               if pydicom.dcmread(p).get("BurnedInAnnotation") == "YES"))
    out = next(ds for ds in map(pydicom.dcmread, (tmp_path / "blank").rglob("*.dcm"))
               if "113101" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence])
    before, after = src.pixel_array, out.pixel_array
    assert (after[3:6, 2:10] == before.min()).all()
    mask = np.ones_like(before, dtype=bool)
    mask[3:6, 2:10] = False
    np.testing.assert_array_equal(after[mask], before[mask])
    assert out.BurnedInAnnotation == "NO"


def test_corrupt_files_are_skipped_the_rest_go_on_and_originals_are_untouched(
        tmp_path: Path) -> None:
    write_phi_folder(tmp_path / "in", _images(3), np.zeros(3, int), ["a"])
    first = next((tmp_path / "in" / "a").glob("*.dcm"))
    (tmp_path / "in" / "a" / "truncated.dcm").write_bytes(first.read_bytes()[:300])
    ds = pydicom.dcmread(first)
    del ds[0xFFFAFFFA]  # Digital Signatures Sequence: so that Pixel Data comes last
    ds.save_as(tmp_path / "whole.dcm")
    (tmp_path / "in" / "a" / "short-pixels.dcm").write_bytes(
        (tmp_path / "whole.dcm").read_bytes()[:-100])
    (tmp_path / "in" / "a" / "notes.txt").write_text("Garcia called about her scan")
    (tmp_path / "in" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")

    def digest() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in (tmp_path / "in").rglob("*") if p.is_file()}

    before = digest()
    report = deidentify_folder(tmp_path / "in", tmp_path / "out", _salt())
    assert digest() == before
    assert report.counts == {"deidentified": 3, "skipped": 4}
    reasons = {r.source: r.reason for r in report.problems}
    assert "DICOMDIR" in reasons["DICOMDIR"]
    assert "truncated" in reasons["a/truncated.dcm"] and "not DICOM" in reasons["a/notes.txt"]
    assert "truncated" in reasons["a/short-pixels.dcm"]
    assert report.log_path == tmp_path / "out-deid-log.csv"
    with open(report.log_path, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 7


@pytest.mark.parametrize("out", ["in/sub", "."])
def test_output_overlapping_input_is_refused(tmp_path: Path, out: str) -> None:
    from privmed.errors import ConfigError

    _write_one(tmp_path / "in")
    target = tmp_path / out if out != "." else tmp_path
    with pytest.raises(ConfigError, match="outside"):
        deidentify_folder(tmp_path / "in", target, _salt())


def test_dates_and_names_the_table_does_not_list_are_removed_too(tmp_path: Path) -> None:
    path, original = _write_one(tmp_path / "in")
    ds = pydicom.dcmread(path)
    ds.EvaluatorName, ds.SecondaryReviewerName = "Haddad^Omar", "Reyes^Ana"
    ds.ExpiryDate, ds.StudyUpdateDateTime = "20250101", "20240105120000"
    ds.ContributingEquipmentSequence[0].DateOfGainCalibration = "20231224"
    ds.save_as(path)
    deidentify_folder(tmp_path / "in", tmp_path / "basic", _salt())
    out = _only_output(tmp_path / "basic")
    for keyword in ("EvaluatorName", "SecondaryReviewerName", "ExpiryDate",
                    "StudyUpdateDateTime"):
        assert keyword not in out
    assert "DateOfGainCalibration" not in out.ContributingEquipmentSequence[0]
    # With --shift-dates they are shifted like every other date; names still go.
    deidentify_folder(tmp_path / "in", tmp_path / "shifted", _salt(),
                      options=ProfileOptions(shift_dates=True))
    shifted = _only_output(tmp_path / "shifted")
    days = _salt().date_shift_days(str(original.PatientID))
    assert shifted.ExpiryDate == (dt.date(2025, 1, 1) - dt.timedelta(days=days)).strftime(
        "%Y%m%d")
    assert "EvaluatorName" not in shifted
