"""A small DICOM class folder whose patients have several images each (Patient ID repeated),
shared by the data, training and report tests of patient-level splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

CLASSES = ("normal", "opacity")


def new_dataset(patient_id: str) -> Dataset:
    """A secondary-capture DX dataset with its file meta (Explicit VR Little Endian), no
    pixels yet; shared by every test that writes DICOM files."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", patient_id
    return ds


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str) -> Path:
    """A minimal valid 16-bit grey DICOM file (Explicit VR Little Endian)."""
    ds = new_dataset(patient_id)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def patient_folder(root: Path, images_per_patient: list[int], size: int = 16,
                   seed: int = 0) -> dict[str, str]:
    """``root/<class>/<file>.dcm``: patient ``P<i>`` has ``images_per_patient[i]`` images, all
    of class ``i % 2`` (an opacity is a bright square). Returns file name -> patient id."""
    rng = np.random.default_rng(seed)  # test pixels, not DP noise
    owners = {}
    for i, count in enumerate(images_per_patient):
        label = i % 2
        for j in range(count):
            pixels = rng.integers(0, 1500, (size, size))
            if label:
                r, c = rng.integers(2, size // 2, 2)
                pixels[r:r + size // 3, c:c + size // 3] += 2000
            name = f"p{i:03d}-{j}.dcm"
            write_dicom(root / CLASSES[label] / name, pixels, f"P{i:03d}")
            owners[name] = f"P{i:03d}"
    return owners
