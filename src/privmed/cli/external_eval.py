"""``privmed evaluate`` on data from elsewhere: which images, checked against the model, and
the result kept in the run as a named external test (``results.json`` ``external_tests``)."""

from __future__ import annotations

from pathlib import Path

from privmed.data.dataset import ImageDataset
from privmed.errors import ConfigError, DataError

DATA_HELP = ("'synthetic' (the embedded synthetic X-rays), a .npz file, an image or DICOM "
             "folder, or a fetched dataset name")


def require_data(data: str | None, command: str) -> str:
    """``--data`` has no default: training or testing on 'synthetic' by accident is worse
    than being asked."""
    if data is None or not str(data).strip():
        raise ConfigError(f"privmed {command} needs --data: {DATA_HELP}.")
    return data


def eval_images(data: str, split: str, size: int | None, labels_csv: Path | None,
                info: dict) -> tuple[ImageDataset, str]:
    """The images to evaluate and how they were chosen, checked against the model."""
    from privmed.data.evalset import load_eval_split

    dataset, how = load_eval_split(data, split, size=size, labels_csv=labels_csv)
    want = tuple(info["image_shape"])
    if tuple(dataset.image_shape) != want:
        hint = (f"pass --size {want[1]} to resize them" if want[1] == want[2]
                else "resize them to the model's size")
        raise DataError(f"The model expects images of shape {want} but {data} has "
                        f"{dataset.image_shape}; {hint}, or check that --data names the "
                        "images you meant.")
    if list(dataset.class_names) != list(info["class_names"]):
        raise DataError(f"The model was trained on classes {info['class_names']} but "
                        f"{data} has {list(dataset.class_names)}.")
    return dataset, how


def default_name(data: str, how: str, split: str) -> str:
    """``hospital-b`` for a folder or file without splits, ``file.npz/test`` for a split."""
    base = Path(str(data).rstrip("/")).name or str(data)
    return base if how.startswith("all of it") else f"{base}/{split}"


def record_evaluation(run: Path, info: dict, name: str | None, data: str, split: str,
                      how: str, dataset: ImageDataset, metrics: dict) -> str | None:
    """Keep the evaluation in the run's results.json and report; a sentence saying so, or
    None when ``run`` is a model file outside a run folder."""
    from privmed.report.external import external_test_entry, record_external_test
    from privmed.report.results import RESULTS_FILENAME, read_results

    run_dir = run if run.is_dir() else run.parent
    if not (run_dir / RESULTS_FILENAME).is_file():
        return None
    results = read_results(run_dir)
    model_run = (info.get("meta") or {}).get("run_id")
    if model_run and results.get("run_id") and model_run != results["run_id"]:
        return None  # a model copied beside another run's results: not this run's test
    label = name or default_name(data, how, split)
    # The run's training images, or its own source taken whole: not a test of the model.
    same_source = _same_place(data, results["data"]["source"])
    own = dataset.dataset_id == results["data"]["dataset_id"] or (
        same_source and (split == "train" or how.startswith("all of it")))
    entry = external_test_entry(source=str(data), how=how, n=len(dataset),
                                dataset_id=dataset.dataset_id, metrics=metrics,
                                training_images=own)
    report, replaced = record_external_test(run_dir, label, entry)
    verb = "Replaced" if replaced else "Recorded"
    warn = (" [yellow]These include the model's training images, so the figures are not a "
            "test.[/]" if own else "")
    return (f"{verb} external test '{label}' ({how}, {len(dataset)} images) in "
            f"{run_dir / RESULTS_FILENAME} and [bold]{report}[/].{warn}")


def _same_place(a: str, b: str) -> bool:
    """Whether two ``--data`` values name the same file, folder or dataset."""
    if a.strip().lower() == b.strip().lower():
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
