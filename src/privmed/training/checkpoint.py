"""Per-epoch checkpoints, written atomically so a crash never corrupts one, and readable by
their owner only (they hold the model's weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from privmed.errors import DataError
from privmed.fileio import save_private_torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    return save_private_torch(state, Path(directory) / CHECKPOINT_NAME)


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
