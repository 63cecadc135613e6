"""Rich progress display for training: loss, val AUC and epsilon so far."""

from __future__ import annotations

from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainingProgress:
    """One bar over all optimisation steps; a no-op when disabled."""

    def __init__(self, total_steps: int, enabled: bool, private: bool) -> None:
        self.enabled = enabled
        self.private = private
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False,
        ) if enabled else None
        self._task = (self._progress.add_task("training", total=total_steps, status="")
                      if self._progress else None)
        self._last = ""

    def __enter__(self) -> TrainingProgress:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress:
            self._progress.stop()

    def advance_to(self, completed: int) -> None:
        if self._progress:
            self._progress.update(self._task, completed=completed)

    def step(self, running_loss: float) -> None:
        if self._progress:
            self._progress.update(self._task, advance=1,
                                  status=f"loss {running_loss:.3f}  {self._last}")

    def epoch_done(self, record: dict, epochs: int) -> None:
        if not self._progress:
            return
        parts = [f"epoch {record['epoch']}/{epochs}"]
        if record.get("val_auc") is not None:
            parts.append(f"val AUC {record['val_auc']:.3f}")
        if self.private and record.get("epsilon") is not None:
            parts.append(f"ε {record['epsilon']:.2f}")
        self._last = "  ".join(parts)
        self._progress.update(self._task, description="training", status=self._last)
