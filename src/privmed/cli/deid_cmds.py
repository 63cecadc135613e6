"""``privmed deid dicom``: de-identify DICOM headers before images leave the hospital."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from privmed.cli.app import console, deid_app, fail

if TYPE_CHECKING:
    from privmed.deid import FolderReport

_SHOWN_PROBLEMS = 20


def print_folder_report(report: FolderReport, out_dir: Path) -> None:
    """Counts per status, and every file that was not de-identified, with its reason."""
    counts = report.counts
    table = Table("status", "files", title="De-identification")
    for status in ("deidentified", "blanked", "refused", "skipped"):
        table.add_row(status, str(counts.get(status, 0)))
    console.print(table)
    unknown = sum(1 for r in report.results
                  if r.burned_in == "unknown" and r.status == "deidentified")
    if unknown:
        console.print(f"[yellow]{unknown} file(s) do not say whether they have burned-in "
                      "text (no Burned In Annotation); check them or rerun with "
                      "--assume-burned-in.[/]")
    problems = report.problems
    if problems:
        listing = Table("file", "status", "reason", title="Not de-identified")
        for r in problems[:_SHOWN_PROBLEMS]:
            listing.add_row(r.source, r.status, r.reason)
        console.print(listing)
        if len(problems) > _SHOWN_PROBLEMS:
            console.print(f"... and {len(problems) - _SHOWN_PROBLEMS} more in the log.")
    console.print(f"Output: {out_dir}\nAudit log: {report.log_path} (maps original file "
                  "names to outputs: keep it at the hospital)")


@deid_app.command("dicom")
def dicom_cmd(
    in_dir: Annotated[Path, typer.Argument(help="Folder of DICOM files (read only).")],
    out_dir: Annotated[Path, typer.Argument(help="Where the de-identified copies go "
                                            "(outside IN_DIR).")],
    salt_file: Annotated[Path, typer.Option(
        "--salt-file", help="The site's secret for UIDs, patient pseudonyms and date shifts; "
        "created if missing. Keep it (same salt = same pseudonyms next time), never share "
        "it.")],
    shift_dates: Annotated[bool, typer.Option(
        "--shift-dates", help="Retain Longitudinal Temporal Information, Modified Dates: "
        "move each patient's dates back by a keyed 1-3650 days instead of removing them.")
    ] = False,
    keep_patient_characteristics: Annotated[bool, typer.Option(
        "--keep-patient-characteristics", help="Retain Patient Characteristics: keep sex, "
        "age, size, weight, smoking and pregnancy status, allergies ...")] = False,
    blank_region: Annotated[str | None, typer.Option(
        "--blank-region", help="X0,Y0,X1,Y1: blank this pixel rectangle in files flagged "
        "Burned In Annotation = YES instead of refusing them.")] = None,
    assume_burned_in: Annotated[bool, typer.Option(
        "--assume-burned-in", help="Treat files without Burned In Annotation as YES.")
    ] = False,
    log: Annotated[Path | None, typer.Option(
        "--log", help="CSV audit log (default: OUT_DIR-deid-log.csv beside OUT_DIR).")
    ] = None,
) -> None:
    """Apply the DICOM PS3.15 Basic Application Level Confidentiality Profile to every
    file; originals are never modified, every file is listed in a CSV audit log."""
    from privmed.deid import deidentify_dicom

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("De-identifying", total=None)
        report = deidentify_dicom(
            in_dir, out_dir, salt_file, shift_dates=shift_dates,
            keep_patient_characteristics=keep_patient_characteristics,
            blank_region=blank_region, assume_burned_in=assume_burned_in, log=log,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            say=console.print)
    print_folder_report(report, out_dir)
    problems = report.problems
    if problems:
        refused = sum(1 for r in problems if r.status == "refused")
        fail(f"{len(problems)} of {len(report.results)} files were not de-identified "
             f"({refused} refused for burned-in text, {len(problems) - refused} skipped); "
             f"each is listed with its reason in {report.log_path}.", 1)


def demo_deid(bundle: Any, out: Path, n_images: int = 12) -> dict:
    """Demo step: export test images as DICOM with fake PHI in every profile attribute (two
    flagged as burned-in, one corrupt), de-identify, prove no PHI is left, load them back."""
    from privmed.data.dicom import load_dicom
    from privmed.deid import ProfileOptions, deidentify_folder, load_or_create_salt
    from privmed.deid.samples import header_bytes, write_phi_folder

    split = bundle.test
    images, labels = split.to_uint8()[:n_images], split.labels[:n_images].numpy()
    export = out / "pacs-export"
    patients = write_phi_folder(export, images, labels, list(split.class_names),
                                burned_in_every=6)
    (export / split.class_names[0] / "scanner-crash.dcm").write_bytes(b"\0" * 128 + b"DICM")
    salt, _ = load_or_create_salt(out / "site.salt")
    report = deidentify_folder(export, out / "deidentified", salt,
                               options=ProfileOptions(shift_dates=True))
    print_folder_report(report, out / "deidentified")
    blob = b"".join(header_bytes(p) for p in (out / "deidentified").rglob("*.dcm"))
    phi = [s for p in patients for s in p.phi_strings()]
    leaked = [s for s in phi if s.encode() in blob]
    loaded = load_dicom(out / "deidentified")
    written = report.counts["deidentified"]
    console.print(f"{len(phi)} PHI strings of {len(patients)} fake patients searched for in the "
                  f"{written} de-identified files: {len(leaked)} found. privmed's DICOM loader "
                  f"reads them back: {len(loaded.train)} images, classes "
                  f"{list(loaded.class_names)}.")
    return {"deidentified": written, "refused": report.counts["refused"],
            "skipped": report.counts["skipped"], "phi_found": len(leaked)}
