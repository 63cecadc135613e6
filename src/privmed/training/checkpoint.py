"""Per-epoch checkpoints, written atomically so a crash never corrupts one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from privmed.errors import DataError

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        # Our own file, holding only tensors, numbers, strings and lists.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"Checkpoint {path} could not be read ({type(exc).__name__}); "
                        "delete it to start the run afresh.") from None
