"""``privmed data fetch | inspect | split``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from privmed.cli.app import console, data_app

if TYPE_CHECKING:
    from privmed.data.dataset import DataBundle, ImageDataset


@data_app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="Dataset name, e.g. pneumoniamnist.")],
    size: Annotated[int, typer.Option("--size", help="Published size: 28, 64, 128 or 224.")
                    ] = 28,
) -> None:
    """Download an official MedMNIST file (MD5-checked) into the user cache."""
    from privmed.data import fetch_medmnist

    path = fetch_medmnist(name, size=size)
    console.print(f"{name} is at [bold]{path}[/]; use it with --data {name}")


@data_app.command("inspect")
def inspect(
    data: Annotated[str, typer.Argument(help="'synthetic', a .npz file, a folder or a name.")],
    size: Annotated[int | None, typer.Option("--size")] = None,
    labels_csv: Annotated[Path | None, typer.Option(
        "--labels-csv", help="CSV of file,label for DICOM folders.")] = None,
    resplit_by_patient: Annotated[bool, typer.Option(
        "--resplit-by-patient", help="Re-split the images so that every patient is in one "
        "split (same split shares, stratified by label, seeded) and write them to --out.")
    ] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="The .npz file --resplit-by-patient writes (MedMNIST layout, with "
        "<split>_patients).")] = None,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the re-split and of the validation hold-out.")] = 0,
) -> None:
    """Print shape, classes, per-class counts and patients of every split."""
    from privmed.data import describe, load_data
    from privmed.data.dataset import DataBundle
    from privmed.data.medmnist import read_npz_splits
    from privmed.data.patients import check_patient_leakage
    from privmed.errors import ConfigError

    if resplit_by_patient != (out is not None):
        raise ConfigError("--resplit-by-patient and --out go together: --out names the file "
                          "the re-split data is written to.")
    if resplit_by_patient:
        _resplit(data, size, labels_csv, seed, out)
        return
    path = Path(data).expanduser()
    held = (read_npz_splits(path) if path.suffix.lower() == ".npz" and path.is_file()
            else {})
    if held and "train" not in held:  # a held-out file (test.npz of 'data split')
        check_patient_leakage(held, data)
        bundle = DataBundle(next(iter(held.values())), source=str(path))
        rows = [{**row, "split": split} for split, ds in held.items()
                for row in describe(DataBundle(ds, source=str(path)))]
        _show(bundle, rows)
    else:
        bundle = load_data(data, size=size, labels_csv=labels_csv, seed=seed)
        _show(bundle, describe(bundle))


def _resplit(data: str, size: int | None, labels_csv: Path | None, seed: int, out: Path
             ) -> None:
    """Load ``data`` as it is (shared patients allowed), re-split it by patient, write
    ``out`` and show what the written file holds."""
    from privmed.data import describe, load_data, resplit_by_patient, save_npz
    from privmed.data.patients import count_shared_patients
    from privmed.errors import DataError

    # No validation carved here: the file keeps the source's own splits, re-drawn.
    source = load_data(data, size=size, labels_csv=labels_csv, seed=seed, val_fraction=0.0,
                       allow_shared_patients=True)
    if source.train.patient_ids is None:
        raise DataError(f"{data} names no patients (no DICOM Patient ID, patient column, "
                        "<split>_patients array or patient-<id>/ folders), so there is "
                        "nothing to re-split by.")
    before = count_shared_patients(source.splits())
    path = save_npz(resplit_by_patient(source, seed=seed), out)
    console.print(f"Re-split {data} by patient (seed {seed}): {before} patient(s) were in two "
                  f"splits, none is now; wrote {path}, use it with --data {path}",
                  markup=False, highlight=False)
    fixed = load_data(path, seed=seed)  # what a later run reads, checked like any source
    _show(fixed, describe(fixed))


def _show(bundle: DataBundle, rows: list[dict]) -> None:
    from privmed.data.patients import describe_patients, patient_summary

    table = Table(title=f"{bundle.source}  (dataset id {bundle.train.dataset_id})")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("shape (C, H, W)")
    for name in bundle.class_names:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row["split"], str(row["n"]), str(tuple(row["shape"])),
                      *(str(row["counts"].get(c, 0)) for c in bundle.class_names))
    console.print(table)
    for line in describe_patients(patient_summary(bundle)):
        console.print(line)


@data_app.command("split")
def split(
    data: Annotated[str, typer.Argument(help="Dataset to split.")],
    sites: Annotated[int, typer.Option("--sites", help="Number of sites K.")] = 3,
    out: Annotated[Path, typer.Option("--out", help="Folder for site-1.npz ... site-K.npz.")
                   ] = Path("sites"),
    scheme: Annotated[str, typer.Option("--scheme", help="iid or dirichlet.")] = "iid",
    alpha: Annotated[float, typer.Option(
        "--alpha", help="Dirichlet concentration; smaller = more label skew.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    size: Annotated[int | None, typer.Option("--size")] = None,
) -> None:
    """Write K site datasets (IID or label-skewed non-IID), reproducible from a seed; when
    the patients are known, each patient's images all go to one site."""
    from privmed.data import load_data, save_npz, split_sites
    from privmed.data.medmnist import save_split_npz

    bundle = load_data(data, size=size, seed=seed)
    parts = split_sites(bundle, sites, scheme=scheme, alpha=alpha, seed=seed)
    by_patient = bundle.train.patient_ids is not None
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"{sites} sites from {bundle.source} ({scheme}, seed {seed})")
    table.add_column("file")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    if by_patient:
        table.add_column("patients", justify="right")
    for name in bundle.class_names:
        table.add_column(f"train {name}", justify="right")

    def patients(*splits: ImageDataset | None) -> list[str]:
        if not by_patient:
            return []
        ids = {p for ds in splits if ds is not None and ds.patient_ids for p in ds.patient_ids}
        return [str(len(ids))]

    for i, part in enumerate(parts, start=1):
        path = save_npz(part, out / f"site-{i}.npz")
        table.add_row(str(path), str(len(part.train)), str(len(part.val) if part.val else 0),
                      *patients(part.train, part.val),
                      *(str(c) for c in part.train.class_counts()))
    if bundle.test is not None:
        held = save_split_npz(bundle.test, out / "test.npz", "test")
        table.add_row(str(held), str(len(bundle.test)), "-", *patients(bundle.test),
                      *(str(c) for c in bundle.test.class_counts()))
    console.print(table)
    if by_patient:
        console.print("Whole patients were dealt to the sites: no patient has images at two "
                      "sites, and each site file keeps its images' patient ids.")
    if bundle.test is not None:
        console.print("test.npz holds the held-out test split, stored as its 'test' split (for "
                      "the coordinator's --heldout, or 'privmed evaluate RUN --data "
                      f"{out / 'test.npz'}').")
