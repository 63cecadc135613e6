"""Edge cases of ``privmed deid dicom``: encodings, pixel layouts, UIDs, dates, private and
non-ASCII attributes, awkward paths and the command line. Known bugs are strict xfails."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cli_run import assert_one_sentence_error, privmed
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from privmed.deid import ProfileOptions, Region, Salt, deidentify_folder
from privmed.deid.profile import table_action
from privmed.errors import ConfigError

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
ROOT = "1.2.826.0.1.3680043.8.498.77."
STUDY = ROOT + "1001"  # odd length: pydicom pads it with a trailing NUL
MRN, NAME, BIRTH = "MRN4711", "Doe^John", "19800101"
EMPTY = ("", "00010101", "00010101010101.000000+0000")
FAKE_JPEG = b"\xff\xd8\xff\xe0 not really a JPEG \xff\xd9"


def _salt() -> Salt:
    return Salt(b"\x07" * 32)


def _ds(pixels: np.ndarray | None = None, *, ts: str = ExplicitVRLittleEndian,
        sop: str = ROOT + "1", patient: str = MRN, burned_in: str | None = "NO",
        samples: int = 1, frames: int = 0, photometric: str | None = None,
        planar: int | None = None, data: bytes | None = None) -> Dataset:
    """A small image with PHI in the usual places; ``pixels`` is (frames,) rows, cols(, 3)."""
    if pixels is None:
        pixels = (np.arange(64, dtype=np.uint16) * 37).reshape(8, 8)
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, patient, BIRTH
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, ROOT + "2001"
    ds.SOPInstanceUID, ds.SOPClassUID, ds.Modality = sop, SC, "OT"
    ds.StudyDate, ds.StudyTime = "20240315", "103000"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric or ("RGB" if samples == 3 else "MONOCHROME2")
    if planar is not None:
        ds.PlanarConfiguration = planar
    if frames:
        ds.NumberOfFrames = frames
    core = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = core[0], core[1]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes() if data is None else data
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC, sop
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    return ds


def _write(ds: Dataset, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        kw.update(little_endian=False, implicit_vr=False)
    pydicom.dcmwrite(path, ds, enforce_file_format=kw.pop("enforce_file_format", True), **kw)
    return path


def _run(tmp_path: Path, **kw):
    report = deidentify_folder(tmp_path / "in", tmp_path / "out", _salt(), **kw)
    return report, sorted((tmp_path / "out").rglob("*.dcm"))


def _only(tmp_path: Path, **kw) -> tuple[pydicom.Dataset, bytes]:
    report, outs = _run(tmp_path, **kw)
    assert len(outs) == 1, [(r.source, r.status, r.reason) for r in report.results]
    return pydicom.dcmread(outs[0]), outs[0].read_bytes()


def _region_mask(shape: tuple[int, ...], region: Region, colour: bool) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    index = (Ellipsis, slice(region.y0, region.y1), slice(region.x0, region.x1))
    mask[index + ((slice(None),) if colour else ())] = True
    return mask


def _assert_only_region_blanked(before: np.ndarray, after: np.ndarray, region: Region,
                                colour: bool = False) -> None:
    assert after.shape == before.shape
    mask = _region_mask(before.shape, region, colour)
    assert (after[mask] == before.min()).all()
    np.testing.assert_array_equal(after[~mask], before[~mask])


PRIVATE_CLASS = "1.3.46.670589.2.5.1.1"  # a vendor's private SOP class


def _no_original_identity(out: pydicom.Dataset) -> None:
    assert str(out.PatientName) == "" and out.PatientID == _salt().patient_pseudonym(MRN)
    assert out.get("PatientBirthDate") in (None, *EMPTY)
    uids = [str(v) for e in out.iterall() if e.VR == "UI" for v in
            (e.value if e.VM > 1 else [e.value])]
    assert not [u for u in uids if u.startswith(ROOT)]
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


# -- transfer syntaxes and file structure ---------------------------------------------------

@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
def test_other_transfer_syntaxes_are_deidentified_and_blanked_in_place(
        tmp_path: Path, ts: str) -> None:
    pixels = (np.arange(80, dtype=np.uint16) * 301 + 7).reshape(8, 10)
    data = pixels.byteswap().tobytes() if ts == ExplicitVRBigEndian else None
    _write(_ds(pixels, ts=ts, burned_in="YES", data=data), tmp_path / "in" / "a.dcm")
    region = Region(1, 2, 4, 5)
    out, _ = _only(tmp_path, blank=region)
    assert out.file_meta.TransferSyntaxUID == ts
    _assert_only_region_blanked(pixels, out.pixel_array, region)
    assert out.BurnedInAnnotation == "NO"
    _no_original_identity(out)


def test_files_without_preamble_are_skipped_and_listed_never_copied(tmp_path: Path) -> None:
    raw = _ds(sop=ROOT + "11")
    del raw.file_meta
    (tmp_path / "in").mkdir()
    pydicom.dcmwrite(tmp_path / "in" / "raw.dcm", raw, implicit_vr=True, little_endian=True)
    whole = _write(_ds(sop=ROOT + "12"), tmp_path / "whole.dcm")
    (tmp_path / "in" / "no-preamble.dcm").write_bytes(whole.read_bytes()[128:])
    report, outs = _run(tmp_path)
    assert outs == []
    assert {r.source: r.status for r in report.results} == {
        "no-preamble.dcm": "skipped", "raw.dcm": "skipped"}
    assert all("not DICOM" in r.reason for r in report.results)


def test_file_meta_keeps_no_private_information_or_station_title(tmp_path: Path) -> None:
    ds = _ds()
    ds.file_meta.SourceApplicationEntityTitle = "STMARYS_CT1"
    ds.file_meta.PrivateInformationCreatorUID = ROOT + "99"
    ds.file_meta.PrivateInformation = b"Doe^John MRN4711"
    _write(ds, tmp_path / "in" / "a.dcm")
    out, blob = _only(tmp_path)
    _no_original_identity(out)
    assert b"MRN4711" not in blob and b"Doe^John" not in blob
    assert b"STMARYS" not in blob and (ROOT + "99").encode() not in blob


def test_file_without_file_meta_gets_a_valid_file_meta(tmp_path: Path) -> None:
    ds = _ds()
    del ds.file_meta
    ds.preamble = b"\0" * 128
    (tmp_path / "in").mkdir()
    pydicom.dcmwrite(tmp_path / "in" / "a.dcm", ds, implicit_vr=False, little_endian=True)
    out, _ = _only(tmp_path)
    assert out.file_meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian
    assert out.file_meta.get("MediaStorageSOPInstanceUID") == out.SOPInstanceUID


def test_compressed_pixels_are_copied_when_clean_and_refused_when_burned_in(
        tmp_path: Path) -> None:
    frame = encapsulate([FAKE_JPEG])
    pixels = np.zeros((8, 8), np.uint8)
    _write(_ds(pixels, ts=JPEGBaseline8Bit, data=frame), tmp_path / "in" / "clean.dcm")
    _write(_ds(pixels, ts=JPEGBaseline8Bit, data=frame, burned_in="YES", sop=ROOT + "2"),
           tmp_path / "in" / "text.dcm")
    report, outs = _run(tmp_path, blank=Region(0, 0, 4, 4))
    status = {r.source: r for r in report.results}
    assert status["clean.dcm"].status == "deidentified"
    assert status["text.dcm"].status == "refused" and "compressed" in status["text.dcm"].reason
    assert len(outs) == 1
    out = pydicom.dcmread(outs[0])
    assert out.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert out.PixelData == frame  # the encapsulated frames are copied byte for byte
    _no_original_identity(out)


# -- pixel layouts with --blank-region --------------------------------------------------------

def _rgb(frames: int = 0) -> np.ndarray:
    shape = (frames, 6, 5, 3) if frames else (6, 5, 3)
    return np.random.default_rng(frames).integers(10, 250, shape, dtype=np.uint8)


def _planar(pixels: np.ndarray) -> bytes:
    """Colour-by-plane bytes (Planar Configuration 1): R plane, G plane, B plane per frame."""
    return np.ascontiguousarray(np.moveaxis(pixels, -1, -3)).tobytes()


@pytest.mark.parametrize("layout", ["mono-multiframe", "rgb-interleaved",
                                    "rgb-interleaved-multiframe"])
def test_blank_region_hits_every_frame_and_only_the_region(tmp_path: Path, layout: str) -> None:
    if layout == "mono-multiframe":
        pixels = np.random.default_rng(2).integers(100, 4000, (3, 6, 5), dtype=np.uint16)
        ds = _ds(pixels, frames=3, burned_in="YES")
    else:
        frames = 2 if layout.endswith("multiframe") else 0
        pixels = _rgb(frames)
        ds = _ds(pixels, samples=3, planar=0, frames=frames, burned_in="YES")
    _write(ds, tmp_path / "in" / "a.dcm")
    region = Region(1, 1, 3, 4)
    out, _ = _only(tmp_path, blank=region)
    _assert_only_region_blanked(pixels, out.pixel_array, region, colour=layout != "mono-multiframe")
    assert "113101" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]


@pytest.mark.parametrize("frames", [0, 2])
def test_blank_region_in_planar_rgb_keeps_the_rest_of_the_image(tmp_path: Path,
                                                                 frames: int) -> None:
    pixels = _rgb(frames)
    _write(_ds(pixels, samples=3, planar=1, frames=frames, burned_in="YES", data=_planar(pixels)),
           tmp_path / "in" / "a.dcm")
    region = Region(1, 1, 3, 4)
    out, _ = _only(tmp_path, blank=region)
    assert out.PlanarConfiguration == 1
    _assert_only_region_blanked(pixels, out.pixel_array, region, colour=True)


@pytest.mark.parametrize("photometric", ["YBR_FULL", "YBR_FULL_422"])
def test_blank_region_in_ybr_is_refused_not_rewritten(tmp_path: Path, photometric: str) -> None:
    rows, cols = 6, 6
    per_pixel = 3 if photometric == "YBR_FULL" else 2
    raw = np.random.default_rng(1).integers(0, 255, rows * cols * per_pixel, dtype=np.uint8)
    ds = _ds(np.zeros((rows, cols), np.uint8), samples=3, planar=0, photometric=photometric,
             burned_in="YES", data=raw.tobytes())
    _write(ds, tmp_path / "in" / "a.dcm")
    report, outs = _run(tmp_path, blank=Region(2, 1, 4, 3))
    assert outs == [] and report.results[0].status == "refused"
    assert f"not {photometric}" in report.results[0].reason


def test_blank_region_in_one_bit_pixel_data_is_refused_not_rewritten(tmp_path: Path) -> None:
    bits = np.random.default_rng(3).integers(0, 2, (8, 16), dtype=np.uint8)
    packed = np.packbits(bits, bitorder="little").tobytes()
    ds = _ds(np.zeros((8, 16), np.uint8), burned_in="YES", data=packed)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    _write(ds, tmp_path / "in" / "a.dcm")
    report, outs = _run(tmp_path, blank=Region(0, 0, 8, 2))
    assert outs == [] and report.results[0].status == "refused"
    assert "at 1 bits" in report.results[0].reason


def test_region_that_does_not_fit_is_refused_and_nothing_written(tmp_path: Path) -> None:
    _write(_ds(burned_in="YES"), tmp_path / "in" / "a.dcm")
    report, outs = _run(tmp_path, blank=Region(0, 0, 9, 2))
    assert outs == [] and report.results[0].status == "refused"
    assert "does not fit the 8x8 image" in report.results[0].reason


def test_burned_in_value_that_is_neither_yes_nor_no_counts_as_unknown(tmp_path: Path) -> None:
    _write(_ds(burned_in="Y"), tmp_path / "in" / "a.dcm")
    report, outs = _run(tmp_path, assume_burned_in=True)
    assert outs == [] and report.results[0].status == "refused"


# -- UIDs ----------------------------------------------------------------------------------------

def test_uids_multi_valued_nested_padded_and_empty_are_keyed_consistently(
        tmp_path: Path) -> None:
    salt = _salt()
    a = _ds(sop=ROOT + "1")
    a.IrradiationEventUID = [ROOT + "8", ROOT + "9"]  # multi-valued instance UIDs
    a.RelatedGeneralSOPClassUID = [CT, PRIVATE_CLASS]  # classes (even private) are kept
    a.FrameOfReferenceUID = ""
    _write(a, tmp_path / "in" / "a.dcm")
    b = _ds(sop=ROOT + "2")
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = SC, ROOT + "1"
    ref.PatientName = NAME
    ref.add_new(0x00091010, "LO", "private in a reference")
    b.ReferencedImageSequence = Sequence([ref])
    path = _write(b, tmp_path / "in" / "b.dcm")
    padded = STUDY.encode() + b"\0"
    assert path.read_bytes().count(padded) == 1
    path.write_bytes(path.read_bytes().replace(padded, STUDY.encode() + b" "))  # space-padded
    report, outs = _run(tmp_path)
    assert report.counts["deidentified"] == 2
    by_sop = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in outs}
    out_a, out_b = by_sop[salt.uid(ROOT + "1")], by_sop[salt.uid(ROOT + "2")]
    assert out_a.IrradiationEventUID == [salt.uid(ROOT + "8"), salt.uid(ROOT + "9")]
    assert out_a.RelatedGeneralSOPClassUID == [CT, PRIVATE_CLASS]
    assert out_a.FrameOfReferenceUID == ""
    item = out_b.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == out_a.SOPInstanceUID  # references still resolve
    assert item.ReferencedSOPClassUID == SC and str(item.PatientName) == ""
    assert not any(e.tag.is_private for e in out_b.iterall())
    assert out_a.StudyInstanceUID == out_b.StudyInstanceUID == salt.uid(STUDY)
    for out in (out_a, out_b):
        _no_original_identity(out)
        assert all(UID(v).is_valid for e in out.iterall() if e.VR == "UI" and e.value
                   for v in (e.value if e.VM > 1 else [e.value]))


def test_coding_scheme_and_context_group_uids_are_kept(tmp_path: Path) -> None:
    ds = _ds()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "51185008", "SCT", "Thorax"
    code.CodingSchemeUID = "2.16.840.1.113883.6.96"  # SNOMED CT (PS3.16 Table 8-1)
    code.ContextUID = "1.2.840.10008.6.1.2"  # CID 4 (PS3.16)
    ds.AnatomicRegionSequence = Sequence([code])
    _write(ds, tmp_path / "in" / "a.dcm")
    out, _ = _only(tmp_path)
    item = out.AnatomicRegionSequence[0]
    assert item.CodingSchemeUID == "2.16.840.1.113883.6.96"
    assert item.ContextUID == "1.2.840.10008.6.1.2"


def test_private_sop_class_keeps_the_file_meta_consistent(tmp_path: Path) -> None:
    ds = _ds()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.3.46.670589.2.5.1.1"
    _write(ds, tmp_path / "in" / "a.dcm")
    out, _ = _only(tmp_path)
    assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID


# -- dates ----------------------------------------------------------------------------------

def test_shift_dates_edge_values_nested_and_one_offset_per_patient(tmp_path: Path) -> None:
    salt = _salt()
    first = _ds(sop=ROOT + "1")
    first.DateOfLastCalibration = ["20240101", "20240201"]  # multi-valued DA
    first.AcquisitionDateTime = "20240315103000.123456+0100"
    first.ContentDate, first.SeriesDate = "00000000", "2024031"  # invalid, malformed
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = SC, ROOT + "7"
    source.InstanceCreationDate, source.PatientBirthDate = "20240310", BIRTH
    equipment = Dataset()
    equipment.Manufacturer, equipment.ContributionDateTime = "ACME", "20240316120000"
    equipment.SourceImageSequence = Sequence([source])  # DA two levels down
    first.ContributingEquipmentSequence = Sequence([equipment])
    _write(first, tmp_path / "in" / "study1" / "a.dcm")
    second = _ds(sop=ROOT + "2")
    second.StudyInstanceUID, second.StudyDate = ROOT + "3001", "20240415"
    _write(second, tmp_path / "in" / "study2" / "b.dcm")

    report, outs = _run(tmp_path, options=ProfileOptions(shift_dates=True))
    assert report.counts["deidentified"] == 2
    days = salt.date_shift_days(MRN)

    def back(value: str) -> str:
        day = dt.datetime.strptime(value, "%Y%m%d").date() - dt.timedelta(days=days)
        return day.strftime("%Y%m%d")

    by_study = {p.parent.name: pydicom.dcmread(p) for p in outs}
    one, two = by_study["study1"], by_study["study2"]
    assert one.StudyDate == back("20240315") and two.StudyDate == back("20240415")
    assert one.DateOfLastCalibration == [back("20240101"), back("20240201")]
    assert one.AcquisitionDateTime == back("20240315") + "103000.123456+0100"
    assert one.ContentDate in EMPTY and one.SeriesDate in EMPTY
    assert one.StudyTime == "103000"
    nested = one.ContributingEquipmentSequence[0]
    assert nested.ContributionDateTime == back("20240316") + "120000"
    assert nested.SourceImageSequence[0].InstanceCreationDate == back("20240310")
    assert nested.SourceImageSequence[0].get("PatientBirthDate") in (None, *EMPTY)
    for path in outs:
        assert BIRTH.encode() not in path.read_bytes()
        assert pydicom.dcmread(path).LongitudinalTemporalInformationModified == "MODIFIED"


def test_without_shift_dates_no_study_date_survives(tmp_path: Path) -> None:
    ds = _ds()
    ds.AcquisitionDateTime, ds.ContentDate = "20240315103000", "20240315"
    _write(ds, tmp_path / "in" / "a.dcm")
    out, blob = _only(tmp_path)
    assert b"20240315" not in blob and BIRTH.encode() not in blob
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


# -- attributes the table names or does not name ------------------------------------------------

def test_descriptors_follow_table_e11_and_body_part_is_kept(tmp_path: Path) -> None:
    text = "Doe John MRN4711 follow-up"
    ds = _ds()
    keywords = ("ImageComments", "StudyDescription", "SeriesDescription", "ProtocolName",
                "RequestedProcedureDescription", "PerformedProcedureStepDescription")
    for keyword in keywords:
        setattr(ds, keyword, text)
    ds.BodyPartExamined = "CHEST"
    _write(ds, tmp_path / "in" / "a.dcm")
    out, blob = _only(tmp_path)
    actions = {k: table_action(pydicom.datadict.tag_for_keyword(k)) for k in keywords}
    assert actions == {"ImageComments": "X", "StudyDescription": "X", "SeriesDescription": "X",
                       "ProtocolName": "D", "RequestedProcedureDescription": "Z",
                       "PerformedProcedureStepDescription": "X"}
    assert text.encode() not in blob and b"MRN4711" not in blob
    assert "ImageComments" not in out and "StudyDescription" not in out
    assert out.ProtocolName == "ANONYMIZED" and out.RequestedProcedureDescription == ""
    # Not in Table E.1-1 (only the Clean Descriptors Option touches it): kept as it is.
    assert table_action(0x00180015) is None and out.BodyPartExamined == "CHEST"


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_private_attributes_are_removed_at_every_level(tmp_path: Path, ts: str) -> None:
    secret = "PRIVATE-PHI Doe John"
    ds = _ds(ts=ts)
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x01, "LO", secret)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
    inner.private_block(0x0013, "ACME 1.0", create=True).add_new(0x01, "LO", secret)
    item = Dataset()
    item.Manufacturer = "ACME"
    item.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", secret)
    item.PurposeOfReferenceCodeSequence = Sequence([inner])  # kept: cleaned inside
    ds.ContributingEquipmentSequence = Sequence([item])
    private_item = Dataset()
    private_item.PatientName = NAME
    ds.private_block(0x0019, "ACME 1.0", create=True).add_new(0x02, "SQ",
                                                               Sequence([private_item]))
    _write(ds, tmp_path / "in" / "a.dcm")
    report, outs = _run(tmp_path)
    assert len(outs) == 1
    out, blob = pydicom.dcmread(outs[0]), outs[0].read_bytes()
    assert not any(e.tag.is_private for e in out.iterall())
    assert b"PRIVATE-PHI" not in blob and b"ACME 1.0" not in blob and b"Doe" not in blob
    code = out.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0]
    assert code.CodeValue == "1"
    assert report.results[0].changes.count_private() >= 5  # creators and values, all levels


def test_private_element_pydicom_cannot_parse_is_skipped_never_copied(tmp_path: Path) -> None:
    ds = _ds()
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091010, "LO", "Doe John")
    path = _write(ds, tmp_path / "in" / "a.dcm")
    good = struct.pack("<HH", 0x9, 0x1010) + b"LO" + struct.pack("<H", 8) + b"Doe John"
    assert good in path.read_bytes()
    path.write_bytes(path.read_bytes().replace(good, good[:4] + b"ZZ" + good[6:]))
    report, outs = _run(tmp_path)
    assert outs == [] and report.results[0].status == "skipped"
    assert "Doe" not in report.results[0].reason


def test_non_ascii_names_are_removed_and_the_output_stays_readable(tmp_path: Path) -> None:
    utf8 = _ds(sop=ROOT + "1")
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "Müller^Jürgen=山田^太郎"
    utf8.OtherPatientNames = ["Müller^J", "Meier^Käthe"]
    utf8.InstitutionName, utf8.Manufacturer = "Klinikum Düsseldorf", "Ärzte GmbH 東芝"
    utf8.PatientAddress = "Königsallee 1, 40212 Düsseldorf " * 100  # far over LO's 64
    _write(utf8, tmp_path / "in" / "utf8.dcm")
    jis = _ds(sop=ROOT + "2")
    jis.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    jis.PatientName = "Yamada^Tarou=山田^太郎"
    _write(jis, tmp_path / "in" / "jis.dcm")
    raw_jis = (tmp_path / "in" / "jis.dcm").read_bytes()
    kanji = "山田".encode("iso2022_jp")[3:-3]  # without the escape sequences
    assert kanji in raw_jis
    report, outs = _run(tmp_path)
    assert report.counts["deidentified"] == 2
    for path in outs:
        blob, out = path.read_bytes(), pydicom.dcmread(path)
        for word in ("Müller", "Jürgen", "山田", "Käthe", "Königsallee", "Yamada"):
            assert word.encode() not in blob, word
        assert kanji not in blob
        assert str(out.PatientName) == "" and "PatientAddress" not in out
        if out.SpecificCharacterSet == "ISO_IR 192":
            assert out.Manufacturer == "Ärzte GmbH 東芝" and out.InstitutionName == "ANONYMIZED"


# -- outputs, names and paths ------------------------------------------------------------------

def test_duplicate_sop_instance_uid_is_not_silently_overwritten(tmp_path: Path) -> None:
    _write(_ds(np.zeros((8, 8), np.uint16)), tmp_path / "in" / "a.dcm")
    _write(_ds(np.ones((8, 8), np.uint16)), tmp_path / "in" / "b.dcm")
    report, outs = _run(tmp_path)
    written = [r.output for r in report.results if r.status == "deidentified"]
    assert len(set(written)) == len(written) == len(outs)


def test_names_with_spaces_and_unicode_are_not_reused(tmp_path: Path) -> None:
    _write(_ds(sop=ROOT + "1"), tmp_path / "in" / "class one" / "Doe John 4711.dcm")
    _write(_ds(sop=ROOT + "2"), tmp_path / "in" / "class one" / "Müller Jürgen 山田.dcm")
    report, outs = _run(tmp_path)
    assert report.counts["deidentified"] == 2
    assert {p.parent.name for p in outs} == {"class one"}  # class folders kept
    names = " ".join(p.name for p in outs)
    assert "Doe" not in names and "Müller" not in names and "山田" not in names
    assert all(p.stem == pydicom.dcmread(p).SOPInstanceUID for p in outs)
    with open(report.log_path, newline="", encoding="utf-8") as fh:
        sources = {row["source"] for row in csv.DictReader(fh)}
    assert sources == {"class one/Doe John 4711.dcm", "class one/Müller Jürgen 山田.dcm"}


def test_file_name_that_is_not_utf8_does_not_abort_the_run(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    latin1 = os.fsdecode(os.fsencode(tmp_path / "in") + b"/M\xfcller.dcm")
    _write(_ds(sop=ROOT + "1"), Path(latin1))
    _write(_ds(sop=ROOT + "2"), tmp_path / "in" / "z.dcm")
    report, outs = _run(tmp_path)
    assert report.counts["deidentified"] == 2 and len(outs) == 2


def test_symlinked_files_are_read_broken_links_skipped_and_outside_left_alone(
        tmp_path: Path) -> None:
    outside = _write(_ds(sop=ROOT + "5"), tmp_path / "outside" / "b.dcm")
    before = outside.read_bytes()
    _write(_ds(sop=ROOT + "1"), tmp_path / "in" / "cls" / "a.dcm")
    (tmp_path / "in" / "cls" / "link.dcm").symlink_to(outside)
    (tmp_path / "in" / "cls" / "broken.dcm").symlink_to(tmp_path / "nowhere.dcm")
    report, outs = _run(tmp_path)
    status = {r.source: r.status for r in report.results}
    assert status["cls/a.dcm"] == status["cls/link.dcm"] == "deidentified"
    assert status["cls/broken.dcm"] == "skipped"
    assert len(outs) == 2 and not any(p.is_symlink() for p in outs)
    assert outside.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["b.dcm"]


def test_output_that_is_a_symlink_into_the_input_is_refused(tmp_path: Path) -> None:
    _write(_ds(), tmp_path / "in" / "cls" / "a.dcm")
    (tmp_path / "out").symlink_to(tmp_path / "in" / "cls")
    with pytest.raises(ConfigError, match="outside"):
        deidentify_folder(tmp_path / "in", tmp_path / "out", _salt())
    assert [p.name for p in (tmp_path / "in" / "cls").iterdir()] == ["a.dcm"]


def test_output_sub_folder_symlinked_into_the_input_is_not_written_through(
        tmp_path: Path) -> None:
    _write(_ds(), tmp_path / "in" / "cls" / "a.dcm")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cls").symlink_to(tmp_path / "in" / "cls")
    with contextlib.suppress(ConfigError):  # refusing is fine too
        deidentify_folder(tmp_path / "in", tmp_path / "out", _salt())
    assert [p.name for p in (tmp_path / "in" / "cls").iterdir()] == ["a.dcm"]


def test_file_vanishing_mid_run_is_skipped_and_the_run_goes_on(tmp_path: Path) -> None:
    for i in range(3):
        _write(_ds(sop=ROOT + str(i + 1)), tmp_path / "in" / f"{i}.dcm")

    def vanish(done: int, total: int) -> None:
        if done == 1:
            (tmp_path / "in" / "1.dcm").unlink()

    report = deidentify_folder(tmp_path / "in", tmp_path / "out", _salt(), progress=vanish)
    assert [r.status for r in report.results] == ["deidentified", "skipped", "deidentified"]
    assert "FileNotFoundError" in report.results[1].reason
    with open(report.log_path, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_named_pipe_in_the_input_does_not_hang_the_run(tmp_path: Path) -> None:
    _write(_ds(), tmp_path / "in" / "a.dcm")
    fifo = tmp_path / "in" / "pipe.dcm"
    os.mkfifo(fifo)
    done: list[object] = []
    worker = threading.Thread(target=lambda: done.append(_run(tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=2)
    hung = worker.is_alive()
    if hung:  # unblock the reader: open the pipe for writing and close it (EOF)
        os.close(os.open(fifo, os.O_WRONLY))
        worker.join(timeout=10)
    assert not hung, "deidentify_folder blocked on a named pipe"
    report, _ = done[0]
    assert {r.source: r.status for r in report.results} == {"a.dcm": "deidentified",
                                                            "pipe.dcm": "skipped"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_skipped_and_the_rest_written(tmp_path: Path) -> None:
    _write(_ds(sop=ROOT + "1"), tmp_path / "in" / "a.dcm")
    locked = _write(_ds(sop=ROOT + "2"), tmp_path / "in" / "b.dcm")
    locked.chmod(0)
    try:
        report, outs = _run(tmp_path)
    finally:
        locked.chmod(0o600)
    assert [r.status for r in report.results] == ["deidentified", "skipped"]
    assert "PermissionError" in report.results[1].reason and len(outs) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the folder's mode")
def test_cli_read_only_output_lists_every_file_and_ends_in_one_sentence(tmp_path: Path) -> None:
    _write(_ds(sop=ROOT + "1"), tmp_path / "in" / "cls" / "a.dcm")
    _write(_ds(sop=ROOT + "2"), tmp_path / "in" / "b.dcm")
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    try:
        proc = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                       "--salt-file", str(tmp_path / "salt"))
    finally:
        (tmp_path / "out").chmod(0o700)
    assert_one_sentence_error(proc, 1, "2 of 2 files were not de-identified")
    with open(tmp_path / "out-deid-log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert all("PermissionError" in r["reason"] for r in rows)
    assert list((tmp_path / "out").rglob("*")) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_no_partial_temp_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  error: BaseException) -> None:
    _write(_ds(), tmp_path / "in" / "a.dcm")

    def half_write(self: Dataset, filename: Path, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
        raise error

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", half_write)
    try:
        report, _ = _run(tmp_path)
        assert report.results[0].status == "skipped"
    except KeyboardInterrupt:
        pass
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


# -- the command line ----------------------------------------------------------------------------

def _cli_folder(root: Path) -> None:
    ds = _ds()
    ds.PatientAddress, ds.PatientTelephoneNumbers = "12 Elm Street", "+44 20 7946 0000"
    ds.InstitutionName, ds.ReferringPhysicianName = "St Mary Clinic", "House^Gregory"
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x01, "LO", "private-phi")
    _write(ds, root / "cls" / "img1.dcm")
    _write(_ds(sop=ROOT + "2", burned_in="YES"), root / "cls" / "img2.dcm")


def test_cli_audit_log_holds_no_values_and_the_salt_is_never_printed(tmp_path: Path) -> None:
    _cli_folder(tmp_path / "in")
    salt = tmp_path / "keys" / "site.salt"
    proc = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                   "--salt-file", str(salt), "--shift-dates")
    assert_one_sentence_error(proc, 1, "1 of 2 files were not de-identified")
    log = (tmp_path / "out-deid-log.csv").read_text(encoding="utf-8")
    key = salt.read_text().strip()
    assert key not in proc.stdout + proc.stderr + log
    for value in ("Doe", "John", MRN, BIRTH, "20240315", "Elm Street", "7946", "St Mary",
                  "House", "Gregory", "private-phi", ROOT):
        assert value not in log, value
        assert value not in proc.stdout + proc.stderr, value
    rows = {r["source"]: r for r in csv.DictReader(log.splitlines())}
    assert rows["cls/img2.dcm"]["status"] == "refused" and rows["cls/img2.dcm"]["output"] == ""
    changed = rows["cls/img1.dcm"]["changed"]
    assert "PatientAddress:removed" in changed and "private(0009,1001):removed" in changed


def _bad_requests(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "saltdir").mkdir()
    (tmp / "short.salt").write_text("00" * 8)
    (tmp / "empty").mkdir()
    (tmp / "linked-out").symlink_to(tmp / "in")
    base = [str(tmp / "in"), str(tmp / "out"), "--salt-file", str(tmp / "salt")]
    return {
        "region-3-numbers": ([*base, "--blank-region", "1,2,3"], "A blank region"),
        "region-negative": ([*base, "--blank-region", "-1,0,5,5"], "empty or negative"),
        "region-words": ([*base, "--blank-region", "a,b,c,d"], "A blank region"),
        "salt-folder": ([*base[:3], str(tmp / "saltdir")], "is a folder"),
        "salt-short": ([*base[:3], str(tmp / "short.salt")], "at least 16 bytes"),
        "input-empty": ([str(tmp / "empty"), *base[1:]], "holds no files"),
        "input-a-file": ([str(tmp / "in" / "cls" / "img1.dcm"), *base[1:]], "not a folder"),
        "output-linked-to-input": ([base[0], str(tmp / "linked-out"), *base[2:]],
                                   "must lie outside"),
        "input-inside-output": ([base[0], str(tmp), *base[2:]], "must lie outside"),
        "log-inside-output": ([*base, "--log", str(tmp / "out" / "log.csv")],
                              "must not lie inside the output folder"),
    }


def test_cli_bad_requests_end_in_one_sentence(tmp_path: Path) -> None:
    _cli_folder(tmp_path / "in")
    for name, (args, words) in _bad_requests(tmp_path).items():
        proc = privmed("deid", "dicom", *args)
        assert "Internal error" not in proc.stderr, name
        assert_one_sentence_error(proc, 2, words)
    assert not (tmp_path / "out").exists()  # nothing written for a refused request


@pytest.mark.parametrize("case", ["output-is-cwd", "output-is-a-file", "log-is-a-folder"])
def test_cli_unusual_output_paths_end_in_a_proper_sentence(tmp_path: Path, case: str) -> None:
    _cli_folder(tmp_path / "in")
    (tmp_path / "work").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "logdir").mkdir()
    salt = str(tmp_path / "salt")
    args = {"output-is-cwd": [str(tmp_path / "in"), "."],
            "output-is-a-file": [str(tmp_path / "in"), str(tmp_path / "afile")],
            "log-is-a-folder": [str(tmp_path / "in"), str(tmp_path / "out"),
                                "--log", str(tmp_path / "logdir")]}[case]
    proc = privmed("deid", "dicom", *args, "--salt-file", salt, cwd=tmp_path / "work")
    assert "Internal error" not in proc.stderr and "Traceback" not in proc.stderr
    if case == "output-is-cwd" and proc.returncode in (0, 1):
        # De-identifying into the current folder is a fine outcome too (exit 1: the
        # folder's burned-in file was refused, in one sentence).
        assert proc.returncode == 0 or proc.stderr.startswith("Error:")
        return
    assert_one_sentence_error(proc, 2)


def test_cli_log_on_the_salt_file_is_refused(tmp_path: Path) -> None:
    _write(_ds(), tmp_path / "in" / "a.dcm")
    salt = tmp_path / "site.salt"
    privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out1"),
            "--salt-file", str(salt))
    key = salt.read_text()
    proc = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out2"),
                   "--salt-file", str(salt), "--log", str(salt))
    intact = salt.read_text() == key  # (compared quietly: no secret in the test report)
    assert intact, "the salt file was overwritten by the log"
    assert_one_sentence_error(proc, 2)


def test_cli_log_inside_the_input_is_refused(tmp_path: Path) -> None:
    _write(_ds(), tmp_path / "in" / "a.dcm")
    notes = tmp_path / "in" / "notes.csv"
    notes.write_text("patient,comment\nDoe,original notes\n")
    proc = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                   "--salt-file", str(tmp_path / "salt"), "--log", str(notes))
    assert notes.read_text() == "patient,comment\nDoe,original notes\n"
    assert_one_sentence_error(proc, 2)


def test_cli_salt_inside_the_input_is_refused_or_ignored(tmp_path: Path) -> None:
    _write(_ds(), tmp_path / "in" / "a.dcm")
    proc = privmed("deid", "dicom", str(tmp_path / "in"), str(tmp_path / "out"),
                   "--salt-file", str(tmp_path / "in" / "site.salt"))
    if proc.returncode == 2:  # refused up front, nothing written into the input
        assert_one_sentence_error(proc, 2)
        assert [p.name for p in (tmp_path / "in").iterdir()] == ["a.dcm"]
        return
    assert proc.returncode == 0, proc.stderr  # or: the salt is not taken for an input
    with open(tmp_path / "out-deid-log.csv", newline="") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["deidentified"]
