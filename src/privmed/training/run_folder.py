"""A run's output folder: the one writer of central training runs and federated jobs.

Both ``train_run`` and ``run_federation`` refuse a folder that already holds a finished
run (or an unfinished one they were not asked to resume), and end the same way: the model
with its privacy figures in ``model.pt``, ``results.json``, ``report.html``, and the
checkpoint removed (it holds weights, never noise state, and a finished run needs none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from privmed.errors import ConfigError
from privmed.models import save_model
from privmed.report import write_report, write_results
from privmed.training.checkpoint import CHECKPOINT_NAME

#: A run's ``privacy`` block without DP: every figure null, so a reader never takes a
#: missing ε for a small one.
NO_PRIVACY: dict[str, Any] = {
    "enabled": False, "epsilon": None, "delta": None, "accountant": None,
    "target_epsilon": None, "noise_multiplier": None, "max_grad_norm": None,
    "sample_rate": None, "unit": None, "units": None, "history": [], "epsilon_curve": [],
    "ledger": None}


def no_privacy(**extra: Any) -> dict[str, Any]:
    """A fresh copy of :data:`NO_PRIVACY`, with ``extra`` keys."""
    return {**{k: (list(v) if isinstance(v, list) else v) for k, v in NO_PRIVACY.items()},
            **extra}


class RunFolder:
    """``out`` as the folder of one run. ``what`` names the run in refusals ("run",
    "federated run")."""

    def __init__(self, out: str | Path, what: str = "run") -> None:
        self.path, self.what = Path(out), what

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    def claim(self, *, resume: bool, need_checkpoint: bool = False) -> None:
        """Refuse a finished run, and an unfinished one unless ``resume``; with
        ``need_checkpoint``, refuse ``resume`` when there is nothing to resume. Reads
        only: nothing is written."""
        if (self.path / "results.json").exists():
            raise ConfigError(f"{self.path} already holds a finished run; choose another "
                              "--out.")
        if self.checkpoint.exists() and not resume:
            raise ConfigError(f"{self.path} already holds an unfinished {self.what}; pass "
                              "--resume to continue it or choose another --out.")
        if need_checkpoint and resume and not self.checkpoint.exists():
            raise ConfigError(f"Nothing to resume: no checkpoint in {self.path}.")

    def create(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def finish(self, model: nn.Module, results: dict[str, Any], *, name: str | None,
               kwargs: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """Write the trained model (with the run's headline privacy figures and ``meta``),
        ``results.json`` and ``report.html``, then drop the checkpoint."""
        data = results["data"]
        privacy = {k: results["privacy"].get(k) for k in ("enabled", "epsilon", "delta",
                                                          "accountant")}
        save_model(self.path / "model.pt", model, name=name, kwargs=kwargs,
                   class_names=data["classes"], image_shape=tuple(data["image_shape"]),
                   meta={"privacy": privacy, **meta})
        write_results(self.path, results)
        write_report(self.path)
        self.checkpoint.unlink(missing_ok=True)
        return results
