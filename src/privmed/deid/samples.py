"""Fake but realistic PHI in every Basic Profile attribute: for the demo, tests and benchmark.

Every attribute of Table E.1-1 gets a value built from one fake patient's identity (name,
MRN, birth date, address, phone), in the attribute's VR; private tags and a nested
sequence carry the same PHI. ``phi_strings`` lists what must never appear in an output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from privmed.deid.profile import REPEATING, TABLE, element_values

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, for the fake originals
_FIRST = ["Maria", "James", "Aisha", "Wei", "Olga", "Kwame", "Lucia", "Arjun"]
_LAST = ["Garcia", "Okafor", "Lindqvist", "Nakamura", "Dubois", "Kowalski", "Haddad", "Reyes"]
_STREETS = ["Elm Street", "Rue Lafayette", "Hauptstrasse", "Calle Mayor", "King Road"]


@dataclass(frozen=True)
class FakePatient:
    """One patient's identity, as a hospital system would hold it."""

    given: str
    family: str
    mrn: str
    birth_date: str
    address: str
    phone: str
    study_date: str

    @property
    def pn(self) -> str:
        return f"{self.family}^{self.given}"

    def phi_strings(self) -> list[str]:
        """Substrings that identify this patient and must not survive de-identification."""
        return [self.family, self.given, self.mrn, self.birth_date, self.address,
                self.phone, self.study_date]


def fake_patients(n: int, seed: int = 0) -> list[FakePatient]:
    """``n`` distinct fake patients (seeded: this is synthetic data, not a secret)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        year, month, day = (int(rng.integers(1940, 2015)), int(rng.integers(1, 13)),
                            int(rng.integers(1, 29)))
        out.append(FakePatient(
            given=_FIRST[i % len(_FIRST)], family=_LAST[(i * 3 + 1) % len(_LAST)] + str(i),
            mrn=f"MRN{int(rng.integers(10**6, 10**7))}", birth_date=f"{year}{month:02d}{day:02d}",
            address=f"{int(rng.integers(1, 200))} {_STREETS[i % len(_STREETS)]}",
            phone=f"+44 20 {int(rng.integers(1000, 9999))} {int(rng.integers(1000, 9999))}",
            study_date=f"2024{int(rng.integers(1, 13)):02d}{int(rng.integers(10, 29)):02d}"))
    return out


def _value(vr: str, p: FakePatient, key: str) -> object:
    """A PHI-bearing value valid for ``vr``; ``key`` makes UIDs unique per attribute."""
    vr = vr.split(" or ")[0]
    text = f"{p.pn} {p.mrn} {p.address} {p.phone}"
    values: dict[str, object] = {
        "AE": p.family[:16], "AS": "047Y", "CS": p.family.upper()[:16], "DA": p.study_date,
        "DS": "72.5", "DT": p.study_date + "103000", "IS": "42", "LO": text[:64],
        "LT": text, "PN": p.pn, "SH": p.mrn[:16], "ST": text, "TM": "103000", "UC": text,
        "UT": text, "UR": f"https://hospital.example/patients/{p.mrn}",
        "UI": generate_uid(_UID_ROOT, [p.mrn, key]), "US": 42, "SS": -42, "UL": 42,
        "SL": -42, "FL": 1.5, "FD": 2.5, "AT": 0x00100010,
    }
    if vr in values:
        return values[vr]
    if vr == "SQ":
        item = Dataset()
        item.PatientName, item.PatientID = p.pn, p.mrn
        item.ReferencedSOPInstanceUID = generate_uid(_UID_ROOT, [p.mrn, key, "ref"])
        return Sequence([item])
    data = text.encode()
    return data + b"\0" * (len(data) % 2)  # OB, OW, UN ...: even-length bytes


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:  # newer than pydicom's dictionary: stored as UN
        return "UN"


def phi_dataset(p: FakePatient, pixels: np.ndarray, *, series: int = 1, instance: int = 1,
                burned_in: str | None = "NO") -> Dataset:
    """A DX image with ``pixels`` (uint8/uint16, H x W) and PHI in every profile attribute."""
    ds = Dataset()
    for tag in sorted(TABLE):
        if tag >> 16 in (0x0000, 0x0002):
            continue  # command elements never occur in files; file meta is set below
        vr = _vr(tag)
        ds.add_new(tag, vr.split(" or ")[0] if vr != "SQ" else "SQ", _value(vr, p, hex(tag)))
    for g, e, _, _, _ in REPEATING:  # one concrete element of each repeating group
        ds.add_new((g << 16) | (e or 0x3000), "OB", _value("OB", p, f"{g:x}"))
    # Sequences the table does not list, holding attributes it does: cleaned inside.
    equipment = Dataset()
    equipment.Manufacturer, equipment.InstitutionName = "ACME", f"Clinic of {p.family}"
    equipment.OperatorsName, equipment.ContributionDateTime = p.pn, p.study_date + "1030"
    step = Dataset()
    step.ScheduledPerformingPhysicianName = p.pn
    step.ScheduledProcedureStepStartDate = p.study_date
    ds.ContributingEquipmentSequence = Sequence([equipment])
    ds.ScheduledProcedureStepSequence = Sequence([step])
    block = ds.private_block(0x0009, "ACME HOSPITAL 1.0", create=True)
    block.add_new(0x01, "LO", f"{p.pn} {p.mrn}")
    block.add_new(0x02, "DA", p.birth_date)
    # The attributes an image needs, with the identity a PACS would write.
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = p.pn, p.mrn, p.birth_date
    ds.PatientSex, ds.PatientAge = "F", "047Y"
    ds.StudyInstanceUID = generate_uid(_UID_ROOT, [p.mrn, "study"])
    ds.SeriesInstanceUID = generate_uid(_UID_ROOT, [p.mrn, "series", str(series)])
    ds.SOPInstanceUID = generate_uid(_UID_ROOT, [p.mrn, str(series), str(instance)])
    ds.FrameOfReferenceUID = generate_uid(_UID_ROOT, [p.mrn, "frame"])
    ds.SOPClassUID, ds.Modality = DX_STORAGE, "DX"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = p.study_date
    ds.SeriesNumber, ds.InstanceNumber = series, instance
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_STORAGE, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_phi_folder(root: str | Path, images: np.ndarray, labels: np.ndarray,
                     class_names: list[str], images_per_patient: int = 2, seed: int = 0,
                     burned_in_every: int = 0) -> list[FakePatient]:
    """Write ``images`` as DICOM under ``root/<class>/<Family>_<Given>_<MRN>_<i>.dcm``, the
    way exports often name files; every ``burned_in_every``-th file says Burned In
    Annotation = YES (0: none). Returns the patients."""
    root = Path(root)
    n_patients = -(-len(images) // images_per_patient)
    patients = fake_patients(n_patients, seed)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        p = patients[i // images_per_patient]
        flag = "YES" if burned_in_every and (i + 1) % burned_in_every == 0 else "NO"
        ds = phi_dataset(p, np.asarray(img), series=1, instance=i % images_per_patient + 1,
                         burned_in=flag)
        folder = root / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(folder / f"{p.family}_{p.given}_{p.mrn}_{i}.dcm", ds,
                         enforce_file_format=True)
    return patients


def header_bytes(path: str | Path) -> bytes:
    """A file's bytes without its Pixel Data and UID values: where PHI strings are searched
    for. Short names ('Wei') occur by chance in megabytes of pixels, and 8-digit dates in
    the digits of keyed UIDs (original UIDs are searched for separately)."""
    raw = Path(path).read_bytes()
    ds = pydicom.dcmread(path)
    values = [str(v).encode() for e in [*ds.file_meta.iterall(), *ds.iterall()]
              if e.VR == "UI" and e.value for v in element_values(e)]
    for value in sorted(set(values), key=len, reverse=True):
        raw = raw.replace(value, b"")
    pixels = ds.get("PixelData")
    return raw.replace(pixels, b"", 1) if pixels else raw
