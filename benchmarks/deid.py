"""DICOM de-identification: throughput and what is left, privmed next to dicom-anonymizer.

    .venv/bin/python benchmarks/deid.py                  # 200 files of 512 x 512 uint16
    .venv/bin/python benchmarks/deid.py --files 50 --size 256

Writes ``--files`` DX images (PneumoniaMNIST test images upscaled when the shared file is
there, noise otherwise) with fake PHI in every Table E.1-1 attribute, a private block and
nested sequences, then de-identifies them twice in the same run: with
``privmed.deid.deidentify_folder`` and with Kitware's ``dicomanonymizer.anonymize_dicom_file``
given the same 2026c table (the library whose table privmed uses). For each it prints
files/s, MB/s, the ratio of the two times, and what survives in the output headers: fake
PHI strings (outside pixel data and UIDs) and original UIDs, and whether a later batch of
the same study, de-identified by a new process, keeps its Study Instance UID.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"


def _images(n: int, size: int) -> tuple[np.ndarray, str]:
    if DEFAULT_DATA.exists():
        from PIL import Image

        raw = np.load(DEFAULT_DATA)["test_images"][:n]
        big = [np.asarray(Image.fromarray(im).resize((size, size))) for im in raw]
        return (np.stack(big).astype(np.uint16) * 16), "PneumoniaMNIST test images, upscaled"
    rng = np.random.default_rng(0)
    return rng.integers(0, 4096, (n, size, size), dtype=np.uint16), "noise images"


def _leaks(out: Path, phi: list[str], old_uids: set[str]) -> tuple[int, int]:
    from privmed.deid.samples import header_bytes  # headers only: 'Wei' occurs in pixels

    blob = b"".join(header_bytes(p) for p in out.rglob("*.dcm"))
    return (sum(s.encode() in blob for s in phi), sum(u.encode() in blob for u in old_uids))


def _study_uids(out: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
            for p in out.rglob("*.dcm")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--per-patient", type=int, default=4)
    args = ap.parse_args()

    from dicomanonymizer import anonymize_dicom_file
    from dicomanonymizer.simpledicomanonymizer import initialize_actions

    from privmed.deid import Salt, deidentify_folder
    from privmed.deid.profile import is_well_known_uid
    from privmed.deid.samples import write_phi_folder

    images, what = _images(args.files, args.size)
    work = Path(tempfile.mkdtemp(prefix="privmed-deid-bench-"))
    try:
        patients = write_phi_folder(work / "in", images, np.zeros(len(images), int), ["all"],
                                    images_per_patient=args.per_patient)
        files = sorted((work / "in").rglob("*.dcm"))
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        phi = [s for p in patients for s in p.phi_strings()]
        old_uids = {str(e.value) for p in files[:args.per_patient]
                    for e in pydicom.dcmread(p).iterall()
                    if e.VR == "UI" and not is_well_known_uid(str(e.value))}
        print(f"{len(files)} files ({what}, {args.size} x {args.size} uint16, "
              f"{megabytes:.1f} MB, {len(patients)} patients); "
              f"{len(phi)} PHI strings and {len(old_uids)} original UIDs searched for after.")

        salt_hex = (b"benchmark-salt-not-a-secret-32by").hex()
        salt = Salt(bytes.fromhex(salt_hex))
        start = time.perf_counter()
        report = deidentify_folder(work / "in", work / "privmed", salt)
        privmed_s = time.perf_counter() - start
        assert report.counts["deidentified"] == len(files), report.counts

        def table() -> dict:
            return initialize_actions("dicomfields_2026c")

        start = time.perf_counter()
        for p in files:
            target = work / "kitware" / p.relative_to(work / "in")
            target.parent.mkdir(parents=True, exist_ok=True)
            anonymize_dicom_file(str(p), str(target), base_rules_gen=table)
        kitware_s = time.perf_counter() - start
        # A later batch with one file of the first study, in a new process each.
        (work / "again").mkdir()
        shutil.copy(files[0], work / "again" / "x.dcm")
        code = {
            "privmed-again": "from privmed.deid import Salt, deidentify_folder; "
                             f"deidentify_folder({str(work / 'again')!r}, {{out!r}}, "
                             f"Salt(bytes.fromhex({salt_hex!r})))",
            "kitware-again": "from dicomanonymizer import anonymize_dicom_file as a; "
                             "from dicomanonymizer.simpledicomanonymizer import "
                             "initialize_actions as i; import os; os.makedirs({out!r}); "
                             f"a({str(work / 'again' / 'x.dcm')!r}, {{out!r}} + '/x.dcm', "
                             "base_rules_gen=lambda: i('dicomfields_2026c'))"}
        for name, line in code.items():
            subprocess.run([sys.executable, "-c", line.format(out=str(work / name))],
                           check=True, capture_output=True)

        rows = []
        for name, out, again, secs in (
                ("privmed deid", work / "privmed", work / "privmed-again", privmed_s),
                ("dicom-anonymizer", work / "kitware", work / "kitware-again", kitware_s)):
            phi_left, uids_left = _leaks(out, phi, old_uids)
            stable = bool(_study_uids(again) & _study_uids(out))
            rows.append((name, len(files) / secs, megabytes / secs, phi_left, uids_left, stable,
                         secs))
        print(f"\n{'tool':<18} {'files/s':>8} {'MB/s':>7} {'PHI left':>9} {'old UIDs':>9} "
              f"{'same study UID next batch':>26}")
        for name, fps, mbps, phi_left, uids_left, stable, _ in rows:
            print(f"{name:<18} {fps:8.1f} {mbps:7.1f} {phi_left:9d} {uids_left:9d} "
                  f"{'yes' if stable else 'no':>26}")
        print(f"\nTime ratio privmed / dicom-anonymizer (same files, same run): "
              f"{rows[0][6] / rows[1][6]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
