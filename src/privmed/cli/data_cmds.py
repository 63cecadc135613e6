"""``privmed data fetch | inspect | split``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from privmed.cli.app import console, data_app


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
) -> None:
    """Print shape, classes and per-class counts of every split."""
    from privmed.data import describe, load_data
    from privmed.data.dataset import DataBundle
    from privmed.data.medmnist import read_npz_splits
    from privmed.data.patients import describe_patients, patient_summary

    path = Path(data).expanduser()
    held = (read_npz_splits(path) if path.suffix.lower() == ".npz" and path.is_file()
            else {})
    if held and "train" not in held:  # a held-out file (test.npz of 'data split')
        only = next(iter(held.values()))
        bundle = DataBundle(only, source=str(path))
        rows = [{**row, "split": split} for split, ds in held.items()
                for row in describe(DataBundle(ds, source=str(path)))]
    else:
        bundle = load_data(data, size=size, labels_csv=labels_csv)
        rows = describe(bundle)
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
    """Write K site datasets (IID or label-skewed non-IID), reproducible from a seed."""
    from privmed.data import load_data, save_npz, split_sites
    from privmed.data.medmnist import save_split_npz

    bundle = load_data(data, size=size, seed=seed)
    parts = split_sites(bundle, sites, scheme=scheme, alpha=alpha, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"{sites} sites from {bundle.source} ({scheme}, seed {seed})")
    table.add_column("file")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    for name in bundle.class_names:
        table.add_column(f"train {name}", justify="right")
    for i, part in enumerate(parts, start=1):
        path = save_npz(part, out / f"site-{i}.npz")
        table.add_row(str(path), str(len(part.train)), str(len(part.val) if part.val else 0),
                      *(str(c) for c in part.train.class_counts()))
    if bundle.test is not None:
        held = save_split_npz(bundle.test, out / "test.npz", "test")
        table.add_row(str(held), str(len(bundle.test)), "-",
                      *(str(c) for c in bundle.test.class_counts()))
    console.print(table)
    if bundle.test is not None:
        console.print("test.npz holds the held-out test split, stored as its 'test' split (for "
                      "the coordinator's --heldout, or 'privmed evaluate RUN --data "
                      f"{out / 'test.npz'}').")
