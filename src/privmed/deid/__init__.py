"""De-identification before data leaves the hospital: DICOM headers (PS3.15 Basic Profile).

Front door: :func:`deidentify_dicom` (folder in, folder out, a salt file); underneath,
:func:`deidentify_folder` with a :class:`Salt` from :func:`load_or_create_salt`.
"""

from privmed.deid.dicom import (
    FileResult,
    FolderReport,
    Region,
    deidentify_dicom,
    deidentify_folder,
)
from privmed.deid.profile import PROFILE_NAME, ProfileApplier, ProfileOptions
from privmed.deid.salt import Salt, load_or_create_salt

__all__ = ["PROFILE_NAME", "FileResult", "FolderReport", "ProfileApplier", "ProfileOptions",
           "Region", "Salt", "deidentify_dicom", "deidentify_folder", "load_or_create_salt"]
