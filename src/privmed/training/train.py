"""``privmed.train``: one call from a data source to a finished run folder.

What ``privmed train`` does after parsing its options: load the data, choose the model
(a registered name or a ``torch.save``-d module file), build the privacy settings, and
call :func:`~privmed.training.run.train_run`, which charges the ledger and writes
``model.pt``, ``results.json`` and ``report.html``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from privmed.data import DataBundle, load_data
from privmed.data.patients import describe_patients, patient_summary
from privmed.errors import ConfigError
from privmed.models import RECOMMENDED_MODEL, list_models
from privmed.privacy import DEFAULT_EPSILON, PrivacyConfig
from privmed.training.config import TrainConfig
from privmed.training.decision import OperatingPointSpec
from privmed.training.run import train_run


def privacy_settings(*, dp: bool = True, epsilon: float | None = None,
                     delta: float | None = None, noise_multiplier: float | None = None,
                     max_grad_norm: float = 1.0, accountant: str = "prv",
                     unit: str = "auto") -> PrivacyConfig | None:
    """The PrivacyConfig of a run (None without DP); ``epsilon`` defaults to 3. Asking
    for no DP and for an ε or σ at once is refused: one of them is a mistake."""
    if not dp:
        if epsilon is not None or noise_multiplier is not None:
            raise ConfigError("--no-dp cannot be combined with --epsilon or "
                              "--noise-multiplier.")
        return None
    return PrivacyConfig(
        target_epsilon=epsilon if epsilon is not None else DEFAULT_EPSILON, delta=delta,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        accountant=accountant, unit=unit)  # type: ignore[arg-type]


def model_choice(model: str | Path | None) -> tuple[str | None, Path | None]:
    """(registered name, model file) for ``model``: a name from ``privmed models``, a
    file holding a ``torch.save``-d nn.Module, or None for the recommended model."""
    if model is None:
        return None, None
    names = {m.name for m in list_models()}
    if str(model) in names:
        return str(model), None
    if not Path(model).exists():
        raise ConfigError(f"'{model}' is neither a registered model "
                          f"({', '.join(sorted(names))}) nor a model file.")
    return None, Path(model)


def train(data: str | Path | DataBundle, out: str | Path, *,
          model: str | Path | None = None, dp: bool = True, epsilon: float | None = None,
          delta: float | None = None, noise_multiplier: float | None = None,
          max_grad_norm: float = 1.0, accountant: str = "prv", privacy_unit: str = "auto",
          ledger: str | Path | None = None, budget_epsilon: float | None = None,
          size: int | None = None, labels_csv: str | Path | None = None,
          positive_class: str | None = None,
          operating_point: OperatingPointSpec | None = None,
          config: TrainConfig | None = None, progress: bool = False,
          say: Callable[[str], None] = print, command: str | None = None,
          **options: Any) -> dict[str, Any]:
    """Train a classifier on ``data`` with DP-SGD and write the run to ``out``.

    ``data``: anything :func:`privmed.load_data` reads (``"synthetic"``, a ``.npz``, an
    image or DICOM folder, a fetched dataset name) or a loaded DataBundle. ``model``: a
    registered name (default ``scatter-linear``) or a model file. DP at ``epsilon``
    (default 3) unless ``dp=False``; ``ledger`` (a SQLite file) is charged before
    training and refuses a run that would overspend (``budget_epsilon`` sets the
    dataset's total budget on first use). ``options`` are TrainConfig fields (``epochs``,
    ``batch_size``, ``lr``, ``seed``, ``resume``...) applied over ``config``.

    Returns the run's ``results.json`` document: ``results["privacy"]["epsilon"]``,
    ``results["metrics"]["test"]["roc_auc"]``... ::

        results = privmed.train("synthetic", "runs/x", epsilon=3, epochs=10)
    """
    privacy = privacy_settings(dp=dp, epsilon=epsilon, delta=delta,
                               noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               accountant=accountant, unit=privacy_unit)
    try:
        config = replace(config or TrainConfig(), **options)
    except TypeError as exc:
        raise ConfigError(f"Unknown training option: {exc}.") from None
    name, model_file = model_choice(model)
    bundle = data if isinstance(data, DataBundle) else load_data(
        data, size=size, labels_csv=labels_csv, seed=config.seed)
    say(f"Training on {bundle.source}: {len(bundle.train)} images "
        f"{bundle.train.image_shape}, classes {list(bundle.class_names)}")
    which = (f"your model file {model_file}" if model_file else name if name else
             f"{RECOMMENDED_MODEL} (the default; choose another with --model)")
    say(f"Model: {which}.")
    for line in describe_patients(patient_summary(bundle)):
        say(line)
    return train_run(bundle, out, model_name=name, model_file=model_file, config=config,
                     privacy=privacy, ledger_path=ledger, budget_epsilon=budget_epsilon,
                     command=command, progress=progress, say=say,
                     positive_class=positive_class, operating_point=operating_point)
