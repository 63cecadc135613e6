"""The images a trained model is evaluated on: a split of a source, or a whole source.

An external test set (another hospital's folder, the ``test.npz`` that ``privmed data
split`` holds out for a coordinator) usually has no splits: all of it is the test set.
A source that has splits is evaluated on the one asked for.
"""

from __future__ import annotations

from pathlib import Path

from privmed.data.dataset import SPLITS, ImageDataset
from privmed.errors import ConfigError


def load_eval_split(source: str | Path, split: str = "test", *, size: int | None = None,
                    labels_csv: str | Path | None = None) -> tuple[ImageDataset, str]:
    """``(images, how)``: ``split`` of ``source`` when it has splits, else all of it.

    ``how`` says which in words ("its 'test' split" / "all of it: it has no splits").
    Nothing is held out for validation here (unlike :func:`load_data` for training).
    """
    from privmed.data import load_data
    from privmed.data.medmnist import read_npz_splits

    if split not in SPLITS:
        raise ConfigError(f"Unknown split '{split}'; use train, val or test.")
    path = Path(str(source)).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz" and labels_csv is None:
        splits = read_npz_splits(path)
        name = str(path)
        if size is not None:
            from privmed.data._common import resize_dataset

            splits = {k: resize_dataset(v, size) for k, v in splits.items()}
    else:
        bundle = load_data(source, size=size, labels_csv=labels_csv, val_fraction=0.0)
        splits, name = bundle.splits(), bundle.source
    if split in splits:
        if set(splits) == {split}:
            return splits[split], "all of it"
        return splits[split], f"its '{split}' split"
    if set(splits) == {"train"}:  # a plain folder or file: no splits, so all of it is test
        return splits["train"], "all of it: it has no splits"
    raise ConfigError(f"{name} has no '{split}' split; choose one of "
                      f"{', '.join(splits)} with --split.")
