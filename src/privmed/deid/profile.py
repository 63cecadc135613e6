"""DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, applied to a dataset.

The attribute table (Table E.1-1, 2026c edition: 652 attributes and 3 repeating groups)
and the VR-consistent dummy/empty values come from Kitware's ``dicom-anonymizer``;
privmed walks the dataset itself so that the rules also reach attributes nested in kept
sequences, every change is recorded per attribute, UIDs and dates are keyed by the
site's salt, and the two options below can be honoured (its own ``anonymize_dataset``
does none of these).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from dicomanonymizer.simpledicomanonymizer import replace_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID_dictionary,
)

from privmed.deid.salt import Salt

TABLE_EDITION = "dicomfields_2026c"
PROFILE_NAME = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"

# Table E.1-1 categories -> the action privmed applies. Where the table leaves the
# choice to the IOD's attribute type (Z/D, X/D, X/Z/D ...), privmed takes the choice that
# is valid for every type: a dummy value (D) or an empty one (Z), never removal.
_CATEGORY_ACTION = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D",
    "X_Z_TAGS": "Z", "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "U*",
}
ACTION_NAMES = {"X": "removed", "Z": "emptied", "D": "dummy", "U": "uid", "U*": "uid",
                "K": "kept", "S": "shifted", "P": "pseudonym", "private": "removed"}

# Retain Patient Characteristics Option (PS3.15 E.3.10): the attributes privmed keeps.
PATIENT_CHARACTERISTICS = (
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup",
    "SmokingStatus", "PregnancyStatus", "PatientSexNeutered", "Allergies", "MedicalAlerts",
    "SpecialNeeds", "PatientState",
)
# Dates that identify the patient are removed even when other dates are shifted.
_NEVER_SHIFTED = ("PatientBirthDate", "PatientBirthTime", "PatientDeathDateInAlternativeCalendar")

# Values of these VRs are removed even where Table E.1-1 does not list the attribute:
# without --shift-dates every date goes (as (0028,0303) REMOVED says), and a person's name
# is never kept.
_ALWAYS_IDENTIFYING_VRS = ("DA", "DT", "PN")

# CID 7050 codes (DCM scheme) written to Deidentification Method Code Sequence.
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_CLEAN_PIXELS = ("113101", "Clean Pixel Data Option")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates "
                                 "Option")
CODE_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")


@dataclass(frozen=True)
class ProfileOptions:
    """Which PS3.15 options to apply on top of the Basic Profile."""

    shift_dates: bool = False
    keep_patient_characteristics: bool = False


@dataclass
class Changes:
    """What one file's de-identification did: attribute keyword -> action name."""

    actions: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def name(elem: pydicom.DataElement) -> str:
        where = f"({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.tag.is_private:
            return "private" + where
        return elem.keyword or where

    def note(self, elem: pydicom.DataElement, action: str) -> None:
        # The first action on an attribute is the one that matters for the log.
        self.actions.setdefault(self.name(elem), ACTION_NAMES[action])

    def count(self, action_name: str) -> int:
        return sum(1 for a in self.actions.values() if a == action_name)

    def count_private(self) -> int:
        return sum(1 for k in self.actions if k.startswith("private("))


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    db = dicom_anonymization_database_selector(TABLE_EDITION)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORY_ACTION.items():
        for tag in db[category]:
            if len(tag) == 2:
                exact[(tag[0] << 16) | tag[1]] = action
            else:  # repeating groups such as Overlay Data (60xx,3000)
                masked.append((tag[0], tag[1], tag[2], tag[3], action))
    return exact, masked


TABLE, REPEATING = _load_table()


def table_action(tag: int) -> str | None:
    """The Basic Profile's action letter for ``tag``, or None when the table omits it."""
    if tag in TABLE:
        return TABLE[tag]
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gmask, emask, action in REPEATING:
        if group & gmask == g & gmask and element & emask == e & emask:
            return action
    return None


# UIDs that name a kind of thing (a SOP class, a coding scheme, a context group), never an
# instance: kept even when private, so that files stay interpretable and consistent.
CLASS_UID_KEYWORDS = frozenset({
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "AffectedSOPClassUID",
    "RequestedSOPClassUID", "ReferencedSOPClassUIDInFile", "RelatedGeneralSOPClassUID",
    "OriginalSpecializedSOPClassUID", "SOPClassesInStudy", "CodingSchemeUID", "ContextUID",
    "MappingResourceUID", "TransferSyntaxUID", "ReferencedTransferSyntaxUIDInFile",
    "ImplementationClassUID",
})
_DICOM_ROOT = "1.2.840.10008."  # the standard's own UIDs: classes, syntaxes, CIDs, ...


def is_well_known_uid(value: str) -> bool:
    """UIDs the standard defines (SOP classes, transfer syntaxes, context groups ...)
    carry no PHI."""
    value = value.rstrip("\0 ")
    return value in UID_dictionary or value.startswith(_DICOM_ROOT)


def empty_value(elem: pydicom.DataElement) -> None:
    """Table E.1-1's Z: a zero-length value, whatever the VR.

    PS3.15 allows a zero-length or a dummy value for Z; privmed writes zero length, so that
    the log's "emptied" is literally true. (``dicom-anonymizer``'s own ``empty_element``
    writes the dummy dates ``00010101`` / ``000000.00`` and the number 0 instead.) The
    table gives a plain Z to Type 2 attributes, for which zero length is valid; where an
    IOD may make one Type 1 it says Z/D, and privmed writes the dummy (logged "dummy").
    """
    elem.value = b"" if elem.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "UN") else (
        "" if isinstance(elem.value, str) or elem.VR in _TEXT_VRS else None)


_TEXT_VRS = ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
             "UC", "UI", "UR", "UT")


def element_values(elem: pydicom.DataElement) -> list:
    """An element's value as a list, whatever its multiplicity."""
    return list(elem.value) if elem.VM > 1 else [elem.value]


def shift_date_value(value: str, vr: str, days: int) -> str | None:
    """Move a DA (YYYYMMDD) or DT (YYYYMMDD...) value back by ``days``; None if unparsable."""
    digits = value.strip()
    if len(digits) < 8 or not digits[:8].isdigit():
        return None
    try:
        day = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
        moved = day - dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return moved.strftime("%Y%m%d") + (digits[8:] if vr == "DT" else "")


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """Only what PS3.10 needs: drops Source AE Title, Private Information and the like."""
    old = getattr(ds, "file_meta", None) or FileMetaDataset()
    syntax = old.get("TransferSyntaxUID")
    if syntax is None:  # a file without meta: say how it was actually encoded
        implicit, little = ds.original_encoding
        syntax = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                  (False, False): ExplicitVRBigEndian}.get((implicit, little),
                                                           ExplicitVRLittleEndian)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", old.get("MediaStorageSOPClassUID"))
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PRIVMED"
    return meta


class ProfileApplier:
    """Applies the profile to one dataset at a time, with one patient's keys."""

    def __init__(self, salt: Salt, options: ProfileOptions) -> None:
        self.salt = salt
        self.options = options
        self._keep = {pydicom.datadict.tag_for_keyword(k) for k in PATIENT_CHARACTERISTICS
                      } if options.keep_patient_characteristics else set()
        self._never_shift = {pydicom.datadict.tag_for_keyword(k) for k in _NEVER_SHIFTED}

    def apply(self, ds: Dataset, pixels_cleaned: bool = False) -> Changes:
        """De-identify ``ds`` in place and return what changed.

        ``pixels_cleaned``: burned-in text was blanked, so the Clean Pixel Data Option is
        recorded.
        """
        changes = Changes()
        patient_id = str(ds.get("PatientID", "") or "")
        shift = self.salt.date_shift_days(patient_id) if self.options.shift_dates else 0
        self._walk(ds, changes, shift)
        pseudonym = self.salt.patient_pseudonym(patient_id)
        if "PatientID" in ds:
            ds.PatientID = pseudonym
            changes.actions["PatientID"] = ACTION_NAMES["P"]
        self._replace_uids(ds, changes)
        if "SOPInstanceUID" in ds:
            ds.file_meta = _file_meta(ds)
        self._stamp(ds, pixels_cleaned)
        return changes

    def _walk(self, ds: Dataset, changes: Changes, shift: int) -> None:
        for elem in list(ds):
            tag = int(elem.tag)
            if elem.tag.is_private:  # Basic Profile: all private attributes removed
                changes.note(elem, "private")
                del ds[elem.tag]
                continue
            if tag in self._keep:
                changes.note(elem, "K")
                continue
            if shift and elem.VR in ("DA", "DT") and tag not in self._never_shift:
                self._shift(elem, shift, changes)
                continue
            if shift and elem.VR == "TM" and tag not in self._never_shift:
                continue  # times of day are kept with shifted dates (E.3.6)
            action = table_action(tag)
            if action is None and elem.VR in _ALWAYS_IDENTIFYING_VRS:
                action = "X"  # a date or a person's name the table does not list
            if elem.VR == "UI" and action == "D":
                action = "U"  # a keyed UID is a valid dummy, and stays consistent
            if action is None or action in ("U", "U*"):
                if elem.VR == "SQ":  # kept sequences are cleaned inside
                    for item in elem.value:
                        self._walk(item, changes, shift)
                continue
            self._act(ds, elem, action, changes)

    @staticmethod
    def _act(ds: Dataset, elem: pydicom.DataElement, action: str, changes: Changes) -> None:
        if elem.value in (None, "", b"") and action != "X":
            return  # nothing to hide in an empty value
        changes.note(elem, action)
        if action == "X":
            del ds[elem.tag]
        elif elem.VR == "SQ":
            # An emptied or dummied sequence keeps no items: they could hold anything.
            elem.value = Sequence()
        else:
            try:
                (empty_value if action == "Z" else replace_element)(elem)
            except NotImplementedError:  # a VR with no dummy value (e.g. OW): remove it
                changes.actions[changes.name(elem)] = ACTION_NAMES["X"]
                del ds[elem.tag]

    @staticmethod
    def _shift(elem: pydicom.DataElement, days: int, changes: Changes) -> None:
        moved = [shift_date_value(str(v), elem.VR, days) for v in element_values(elem) if v]
        if not moved:
            return
        if any(v is None for v in moved):  # an unreadable date cannot be shifted safely
            changes.note(elem, "Z")
            empty_value(elem)
            return
        changes.note(elem, "S")
        elem.value = moved if len(moved) > 1 else moved[0]

    def _replace_uids(self, ds: Dataset, changes: Changes) -> None:
        """Every UID the standard does not define, anywhere: replaced by its keyed UID."""
        def visit(dataset: Dataset, elem: pydicom.DataElement) -> None:
            if elem.VR != "UI" or not elem.value or elem.keyword in CLASS_UID_KEYWORDS:
                return
            values = element_values(elem)
            new = [v if not v or is_well_known_uid(str(v)) else self.salt.uid(str(v))
                   for v in values]
            if new != values:
                changes.note(elem, "U")
                elem.value = new if len(new) > 1 else new[0]
        ds.walk(visit)

    def _stamp(self, ds: Dataset, pixels_cleaned: bool) -> None:
        """Patient Identity Removed, the method in words and as CID 7050 codes."""
        codes = [CODE_BASIC]
        if self.options.shift_dates:
            codes.append(CODE_MODIFIED_DATES)
        if self.options.keep_patient_characteristics:
            codes.append(CODE_PATIENT_CHARACTERISTICS)
        if pixels_cleaned:
            codes.append(CODE_CLEAN_PIXELS)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = ["privmed"] + [m for _, m in codes]  # LO: 64 chars each
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self.options.shift_dates else "REMOVED")

