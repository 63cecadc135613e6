"""De-identify a folder of DICOM files: profile, burned-in check, audit log, never in place.

Each input file ends in exactly one of four states, all listed in the CSV audit log:
``deidentified``, ``blanked`` (burned-in text blanked in a user-given region, then
de-identified), ``refused`` (Burned In Annotation = YES and no region given, or a region
that cannot be blanked) and ``skipped`` (corrupt, truncated, not DICOM, no image, or a
DICOMDIR). Outputs are
named by their new SOP Instance UID inside the same sub-folders (class folders stay
labels); input file names, which often carry names or MRNs, are not reused.
"""

from __future__ import annotations

import csv
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_expected_length

from privmed.deid.profile import Changes, ProfileApplier, ProfileOptions
from privmed.deid.salt import Salt, load_or_create_salt
from privmed.errors import ConfigError, DataError
from privmed.fileio import open_private_text

LOG_COLUMNS = ("source", "output", "status", "reason", "patient", "burned_in", "removed",
               "emptied", "dummy", "uid", "shifted", "kept", "private_removed", "changed")
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError,
                AttributeError, IndexError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Region:
    """A rectangle of pixels, ``x0,y0`` inclusive to ``x1,y1`` exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def parse(cls, text: str) -> Region:
        try:
            x0, y0, x1, y1 = (int(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"A blank region is X0,Y0,X1,Y1 in pixels, got '{text}'."
                              ) from None
        if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
            raise ConfigError(f"Blank region '{text}' is empty or negative: need "
                              "0 <= X0 < X1 and 0 <= Y0 < Y1.")
        return cls(x0, y0, x1, y1)


@dataclass
class FileResult:
    """One input file's outcome, as one row of the audit log."""

    source: str
    status: str
    reason: str = ""
    output: str = ""
    patient: str = ""
    burned_in: str = ""
    changes: Changes = field(default_factory=Changes)

    def row(self) -> dict[str, str | int]:
        c = self.changes
        return {"source": self.source, "output": self.output, "status": self.status,
                "reason": self.reason, "patient": self.patient, "burned_in": self.burned_in,
                "removed": c.count("removed"), "emptied": c.count("emptied"),
                "dummy": c.count("dummy"), "uid": c.count("uid"), "shifted": c.count("shifted"),
                "kept": c.count("kept"), "private_removed": c.count_private(),
                "changed": ";".join(f"{k}:{v}" for k, v in sorted(c.actions.items()))}


@dataclass
class FolderReport:
    """Counts per status and the files that were not de-identified."""

    results: list[FileResult]
    log_path: Path

    @property
    def counts(self) -> Counter:
        return Counter(r.status for r in self.results)

    @property
    def problems(self) -> list[FileResult]:
        return [r for r in self.results if r.status in ("refused", "skipped")]


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID | None:
    return ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None


def _pixel_problem(ds: pydicom.Dataset) -> str:
    """Why this is not a whole image ('' if it is): privmed exports images for training."""
    if "PixelData" not in ds:
        return "no pixel data (truncated, or not an image)"
    syntax = _transfer_syntax(ds)
    native = syntax is None or not syntax.is_compressed
    if native and len(ds.PixelData) < get_expected_length(ds):
        return "pixel data shorter than its rows x columns x frames (truncated)"
    return ""


def _burned_in_flag(ds: pydicom.Dataset) -> str:
    """YES, NO or unknown (absent); any other value (``Y``, ``YES\\NO`` ...) counts as YES."""
    value = ds.get("BurnedInAnnotation")
    if value in (None, ""):
        return "unknown"
    text = str(value).strip().upper()
    return "NO" if text == "NO" else "YES"


_BLANKABLE = ("MONOCHROME1", "MONOCHROME2", "RGB")


def blank_region(ds: pydicom.Dataset, region: Region) -> None:
    """Set ``region`` of every frame to the image's minimum, keeping the stored layout.

    Native (uncompressed) grey or RGB pixel data of 8, 16 or 32 bits only: anything else
    is refused rather than re-encoded.
    """
    syntax = _transfer_syntax(ds)
    if syntax is not None and syntax.is_compressed:
        raise ValueError(f"its pixel data is compressed ({syntax.name}), which privmed "
                         "does not re-encode")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    bits = int(ds.get("BitsAllocated", 0))
    if photometric not in _BLANKABLE or bits not in (8, 16, 32):
        raise ValueError(f"privmed blanks only 8/16/32-bit grey or RGB pixel data, not "
                         f"{photometric or 'unknown'} at {bits} bits")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if region.x1 > cols or region.y1 > rows:
        raise ValueError(f"the region does not fit the {cols}x{rows} image")
    pixels = np.array(pixel_array(ds, raw=True))  # stored values, frames first if several
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    view = pixels if frames > 1 else pixels[None]
    view[:, region.y0:region.y1, region.x0:region.x1] = pixels.min()
    if colour and int(ds.get("PlanarConfiguration", 0)) == 1:  # stored plane by plane
        view = view.transpose(0, 3, 1, 2)
    ds.PixelData = np.ascontiguousarray(view).tobytes()
    ds.BurnedInAnnotation = "NO"


def check_folders(in_dir: Path, out_dir: Path, extra: list[Path]) -> None:
    """Before anything is created: refuse an empty input, an output that overlaps the
    input, and a salt or log file in either folder, on top of another, or on a folder."""
    if not in_dir.is_dir():
        raise DataError(f"Input folder {in_dir} does not exist or is not a folder.")
    if next(_entries(in_dir), None) is None:
        raise DataError(f"Input folder {in_dir} holds no files.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"Output folder {out_dir} exists and is not a folder.")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ConfigError(f"Output folder {out_dir} must lie outside input folder {in_dir} "
                          "(and not contain it): originals are never modified.")
    resolved = [path.resolve() for path in extra]
    for path, p in zip(extra, resolved, strict=True):
        if p.is_relative_to(dst):
            raise ConfigError(f"{path} must not lie inside the output folder {out_dir}: "
                              "the output is what leaves the hospital.")
        if p.is_relative_to(src):
            raise ConfigError(f"{path} must not lie inside the input folder {in_dir}: "
                              "the input is only ever read.")
        if p.is_dir():
            raise ConfigError(f"{path} is a folder; give a file path.")
    if len(set(resolved)) < len(resolved):
        raise ConfigError("The audit log and the salt file must be different files.")


def default_log_path(out_dir: Path) -> Path:
    """``<out_dir>-deid-log.csv`` beside the output folder, never inside it."""
    out_dir = Path(out_dir).expanduser().resolve()
    return out_dir.with_name(out_dir.name + "-deid-log.csv")


def _entries(root: Path) -> Iterator[tuple[Path, str]]:
    """Every entry under ``root`` in a stable order, with why it is not a file to read
    ('' for a regular file, or a link to one)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames):
            if (Path(dirpath) / name).is_symlink():
                yield Path(dirpath) / name, "a linked folder, not followed"
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                regular = stat.S_ISREG(path.stat().st_mode)
            except OSError:
                yield path, "unreadable, or a broken link"
                continue
            yield path, "" if regular else "not a regular file (pipe, socket or device)"


def _printable(rel: Path) -> str:
    """A path for the log even when the file name is not valid UTF-8."""
    return rel.as_posix().encode("utf-8", "backslashreplace").decode("utf-8")


def _write_atomically(ds: pydicom.Dataset, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, target)  # a crash never leaves a half-written output
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def deidentify_file(path: Path, rel: Path, out_dir: Path, applier: ProfileApplier,
                    blank: Region | None, assume_burned_in: bool,
                    written: dict[str, str] | None = None) -> FileResult:
    """De-identify one file into ``out_dir``; a failure is reported, never raised.

    ``written`` maps outputs of this run to their sources, so that two inputs with one
    SOP Instance UID cannot silently become one output.
    """
    source = _printable(rel)
    if path.name.upper() == "DICOMDIR":
        return FileResult(source, "skipped", "a DICOMDIR lists patient names; rebuild it "
                          "from the output")
    try:
        ds = pydicom.dcmread(path)
        problem = _pixel_problem(ds)
    except _READ_ERRORS as exc:
        return FileResult(source, "skipped", f"not DICOM, corrupt or truncated "
                          f"({type(exc).__name__})")
    if problem:
        return FileResult(source, "skipped", problem)
    if "SOPInstanceUID" not in ds:
        return FileResult(source, "skipped", "no SOP Instance UID (not a storable instance)")
    burned = _burned_in_flag(ds)
    if burned == "unknown" and assume_burned_in:
        burned = "YES"
    cleaned = False
    if burned == "YES":
        if blank is None:
            return FileResult(source, "refused", "Burned In Annotation is YES; give "
                              "--blank-region to blank the text, or remove the file",
                              burned_in=burned)
        try:
            blank_region(ds, blank)
        except _READ_ERRORS as exc:
            return FileResult(source, "refused", f"burned-in text cannot be blanked: {exc}",
                              burned_in=burned)
        cleaned = True
    written = {} if written is None else written
    try:
        changes = applier.apply(ds, pixels_cleaned=cleaned)
        out_rel = rel.parent / f"{ds.SOPInstanceUID}.dcm"
        if out_rel.as_posix() in written:
            return FileResult(source, "skipped", "same SOP Instance UID as "
                              f"{written[out_rel.as_posix()]} (a duplicate instance)",
                              burned_in=burned)
        target = out_dir / out_rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.parent.resolve().is_relative_to(out_dir.resolve()):
            return FileResult(source, "skipped", f"{target.parent} links outside the output "
                              "folder", burned_in=burned)
        _write_atomically(ds, target)
    except _READ_ERRORS as exc:
        return FileResult(source, "skipped", f"cannot be de-identified or written "
                          f"({type(exc).__name__}: {exc})", burned_in=burned)
    written[out_rel.as_posix()] = source
    return FileResult(source, "blanked" if cleaned else "deidentified", output=out_rel
                      .as_posix(), patient=str(ds.get("PatientID", "")), burned_in=burned,
                      changes=changes)


def deidentify_folder(in_dir: str | Path, out_dir: str | Path, salt: Salt, *,
                      log_path: str | Path | None = None,
                      options: ProfileOptions | None = None,
                      blank: Region | None = None, assume_burned_in: bool = False,
                      salt_path: str | Path | None = None,
                      progress: Callable[[int, int], None] | None = None) -> FolderReport:
    """De-identify every file under ``in_dir`` into ``out_dir``; write the CSV audit log.

    The log (default: ``<out_dir>-deid-log.csv`` beside the output folder, since it maps
    original file names to outputs; mode 0600) gets one row per input file as it is
    processed.
    """
    in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    log = Path(log_path) if log_path else default_log_path(out_dir)
    check_folders(in_dir, out_dir, [log] + ([Path(salt_path)] if salt_path else []))
    files = list(_entries(in_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    applier = ProfileApplier(salt, options or ProfileOptions())
    results: list[FileResult] = []
    with open_private_text(log) as fh:  # 0600: it maps original file names to outputs
        writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        written: dict[str, str] = {}
        for i, (path, why_not) in enumerate(files):
            rel = path.relative_to(in_dir)
            result = (FileResult(_printable(rel), "skipped", why_not) if why_not else
                      deidentify_file(path, rel, out_dir, applier, blank, assume_burned_in,
                                      written))
            writer.writerow(result.row())
            fh.flush()
            results.append(result)
            if progress is not None:
                progress(i + 1, len(files))
    return FolderReport(results, log)


def deidentify_dicom(in_dir: str | Path, out_dir: str | Path, salt_file: str | Path, *,
                     shift_dates: bool = False, keep_patient_characteristics: bool = False,
                     blank_region: Region | str | None = None, assume_burned_in: bool = False,
                     log: str | Path | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     say: Callable[[str], None] | None = print) -> FolderReport:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir`` with the PS3.15 Basic
    Application Level Confidentiality Profile; the originals are never modified.

    ``salt_file``: the site's secret for UIDs, patient pseudonyms and date shifts, created
    (mode 0600) if missing; keep it to de-identify later batches consistently, never share
    it. Options of the profile: ``shift_dates`` (move each patient's dates by a keyed
    1-3650 days instead of removing them), ``keep_patient_characteristics`` (sex, age,
    size...). A file flagged Burned In Annotation is refused unless ``blank_region``
    (``Region`` or ``"X0,Y0,X1,Y1"``) is blanked; ``assume_burned_in`` treats files
    without the flag as flagged. Every file is listed in a CSV audit log (``log``,
    default ``OUT_DIR-deid-log.csv`` beside the output). Returns the FolderReport:
    ``counts`` per status and ``problems`` (files not de-identified, with the reason). ::

        report = privmed.deidentify_dicom("pacs-export", "deidentified", "site.salt")
    """
    in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    region = Region.parse(blank_region) if isinstance(blank_region, str) else blank_region
    log_path = Path(log) if log is not None else default_log_path(out_dir)
    check_folders(in_dir, out_dir, [Path(salt_file), log_path])  # before a salt is created
    salt, created = load_or_create_salt(salt_file)
    if created and say is not None:
        say(f"Created a new salt in {salt_file}: keep it to de-identify later batches "
            "consistently, and never share it.")
    options = ProfileOptions(shift_dates=shift_dates,
                             keep_patient_characteristics=keep_patient_characteristics)
    return deidentify_folder(in_dir, out_dir, salt, log_path=log_path, options=options,
                             blank=region, assume_burned_in=assume_burned_in,
                             salt_path=salt_file, progress=progress)
