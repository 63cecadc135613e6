"""A training run on disk: data bundle in, ``runs/NAME/`` out.

``train_run`` is what ``privmed train`` and ``privmed demo`` call: it builds
the model, charges the ledger, calls :func:`fit`, evaluates the test split
and writes ``model.pt``, ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privmed import __version__
from privmed.data.dataset import DataBundle
from privmed.errors import ConfigError
from privmed.models import (
    count_parameters,
    create_model,
    load_user_model,
    model_kwargs,
)
from privmed.models.registry import RECOMMENDED_MODEL
from privmed.privacy import BudgetLedger, PrivacyConfig
from privmed.privacy.records import protected_units
from privmed.report import SCHEMA_VERSION, environment_info
from privmed.training.config import TrainConfig
from privmed.training.decision import (
    DEFAULT_THRESHOLD,
    OperatingPoint,
    OperatingPointSpec,
    choose_operating_point,
    resolve_positive_class,
)
from privmed.training.fit import FitResult, fit
from privmed.training.metrics import (
    compute_metrics,
    evaluate,
    performance_summary,
    predict_dataset,
)
from privmed.training.privacy_notes import add_run_notes, run_warnings
from privmed.training.run_folder import RunFolder


def open_ledger(path: str | Path, dataset_id: str, budget_epsilon: float | None,
                budget_delta: float) -> BudgetLedger:
    """Open the ledger and, when asked, give a dataset its first budget."""
    ledger = BudgetLedger(path)
    if budget_epsilon is None:
        return ledger
    current = ledger.budget(dataset_id)
    if current is None:
        ledger.set_budget(dataset_id, budget_epsilon, budget_delta)
    elif abs(current["epsilon"] - budget_epsilon) > 1e-12:
        raise ConfigError(
            f"Dataset {dataset_id} already has a budget of epsilon {current['epsilon']:g} in "
            f"{path}; change it deliberately with 'privmed ledger set-budget'.")
    return ledger


def train_run(
    bundle: DataBundle,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    model_file: str | Path | None = None,
    config: TrainConfig | None = None,
    privacy: PrivacyConfig | None = None,
    ledger_path: str | Path | None = None,
    budget_epsilon: float | None = None,
    command: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    positive_class: str | None = None,
    operating_point: OperatingPointSpec | None = None,
) -> dict[str, Any]:
    """Train on ``bundle.train`` (validating on ``bundle.val``) and write the run.

    A binary task's positive class is ``positive_class`` or the class named like a
    finding (ConfigError before any training when the names do not say); its threshold is
    chosen on the validation split by ``operating_point`` (default Youden's J) and applied
    to the test split, stored in ``model.pt`` and ``results.json``.
    """
    folder = RunFolder(out_dir)
    config = config or TrainConfig()
    folder.claim(resume=config.resume)
    # Before anything is written or spent: a binary task must know which class is the finding.
    positive = resolve_positive_class(bundle.class_names, positive_class)
    if positive is None and operating_point is not None:
        raise ConfigError(f"--operating-point and --threshold apply to two-class tasks; this "
                          f"one has {len(bundle.class_names)} classes and decides by the "
                          "highest score.")
    out = folder.create()
    config.checkpoint_dir = out

    train, n_classes = bundle.train, bundle.train.num_classes
    if model_file is not None:
        model, notes = load_user_model(model_file)
        for note in notes:
            say(note)
        name, kwargs = None, {}
    else:
        name = model_name or RECOMMENDED_MODEL
        kwargs = model_kwargs(name, train.image_shape)
        model = create_model(name, train.image_shape[0], n_classes, **kwargs)

    ledger = None
    if ledger_path is not None:
        if privacy is None:
            raise ConfigError("A ledger records DP spends; it cannot be used with --no-dp.")
        unit, units = protected_units(privacy.unit, train)
        ledger = open_ledger(ledger_path, train.dataset_id, budget_epsilon,
                             privacy.resolved_delta(units, unit))
    elif budget_epsilon is not None:
        raise ConfigError("--budget-epsilon needs --ledger FILE to record the budget in.")
    dp_notes = run_warnings(privacy, train, config.batch_size)  # δ vs 1/N, q = 1
    for note in dp_notes:
        say(f"Warning: {note}")

    result = fit(model, train, bundle.val, config, privacy, ledger=ledger,
                 run_id=_run_id(out), progress=progress)
    metrics = dict(result.metrics)
    op = None
    if positive is not None:
        op, metrics["val"] = _operating_point(result, bundle, positive, operating_point)
        if metrics["val"] is None:
            del metrics["val"]
    if bundle.test is not None:
        metrics["test"] = evaluate(result.model, bundle.test, config.eval_batch_size,
                                   operating_point=op)

    results = build_results(bundle, result, metrics, model_name=name or "custom",
                            command=command, operating_point=op)
    add_run_notes(results, bundle, dp_notes)  # privacy unit, group privacy, patients
    return folder.finish(result.model, results, name=name, kwargs=kwargs, meta={
        "dataset_id": train.dataset_id, "run_id": result.run_id,
        "operating_point": op.to_dict() if op is not None else None,
        "performance": performance_summary(metrics)})


def _operating_point(result: FitResult, bundle: DataBundle, positive: int,
                     spec: OperatingPointSpec | None) -> tuple[OperatingPoint, dict | None]:
    """The threshold chosen on the validation split, and the validation metrics at it."""
    names = bundle.class_names
    if bundle.val is None:
        if spec is not None and spec.method == "fixed":
            return choose_operating_point([], [], names, positive, spec), None
        return OperatingPoint(positive, names[positive], DEFAULT_THRESHOLD, "default",
                              note="there is no validation split to choose it on"), None
    probs = predict_dataset(result.model, bundle.val, result.config.eval_batch_size)
    labels = bundle.val.labels.numpy()
    op = choose_operating_point(labels, probs, names, positive, spec)
    return op, compute_metrics(labels, probs, class_names=names, operating_point=op)


def _run_id(out: Path) -> str:
    """A readable, ledger-safe id: the folder name plus the start time."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", out.resolve().name).strip("-._") or "run"
    return f"{name[:100]}-{time.strftime('%Y%m%dT%H%M%S')}"


def build_results(bundle: DataBundle, result: FitResult, metrics: dict[str, dict], *,
                  model_name: str, command: str | None = None,
                  operating_point: OperatingPoint | None = None) -> dict[str, Any]:
    """The ``results.json`` document for a finished fit (docs/results-schema.md)."""
    extra = {"operating_point": operating_point.to_dict()} if operating_point else {}
    return {
        "schema": SCHEMA_VERSION,
        "privmed_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "seed": result.config.seed,
        "run_id": result.run_id,
        "data": {
            "source": bundle.source,
            "dataset_id": bundle.train.dataset_id,
            "classes": list(bundle.class_names),
            "image_shape": list(bundle.train.image_shape),
            "sizes": {k: len(v) for k, v in bundle.splits().items()},
        },
        "model": {"name": model_name, "parameters": count_parameters(result.model)},
        "training": {"config": result.config.to_dict(), "epochs": result.epochs,
                     "seconds": round(result.seconds, 3)},
        "privacy": result.privacy,
        "metrics": metrics,
        **extra,
        "environment": environment_info(),
    }
