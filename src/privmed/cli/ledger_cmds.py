"""``privmed ledger show | set-budget``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from privmed.cli.app import console, ledger_app


@ledger_app.command("show")
def show(
    ledger: Annotated[Path, typer.Argument(help="The ledger's SQLite file.")],
    runs: Annotated[bool, typer.Option("--runs", help="List every spend, too.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the datasets (and with --runs the spends) as JSON.")] = False,
) -> None:
    """Budget, spent and remaining epsilon per dataset, and the spend over its records.

    Spend is charged per record (patient or image): ``spent`` is the most charged
    record's epsilon, and the record columns show how spend is spread over them.
    """
    from privmed.errors import DataError
    from privmed.privacy import BudgetLedger

    if not ledger.exists():
        raise DataError(f"Ledger {ledger} does not exist.")
    book = BudgetLedger(ledger)
    summary = book.summary()
    if as_json:
        out: dict = {"ledger": str(ledger), "datasets": summary}
        if runs:
            out["spends"] = book.entries()
        typer.echo(json.dumps(_finite(out), indent=2))
        return
    table = Table(title=f"Privacy budget ledger {ledger}")
    for col in ("dataset", "unit", "budget ε", "δ", "spent ε", "remaining ε", "runs",
                "records", "ε per record min / median / max", "≥ 90% of budget"):
        table.add_column(col, justify="left" if col in ("dataset", "unit") else "right")
    for row in summary:
        remaining = row["remaining"] if math.isfinite(row["remaining"]) else None
        spread = row["record_epsilon"]
        table.add_row(
            row["dataset_id"], row["unit"], _f(row["epsilon"]), _g(row["delta"]),
            _f(row["spent"]), _f(remaining), str(row["runs"]),
            "-" if row["records"] is None else str(row["records"]),
            "-" if spread is None else " / ".join(_f(spread[k]) for k in ("min", "median",
                                                                            "max")),
            "-" if row["near_budget"] is None else str(row["near_budget"]))
    console.print(table)
    if any(row["records"] is None and row["runs"] for row in summary):
        console.print("Datasets without records ('-') were charged by their id alone (runs "
                      "that did not name their images or patients).")
    if runs:
        detail = Table(title="Spends")
        for col in ("dataset", "run", "status", "unit", "σ", "q", "steps", "ε alone"):
            detail.add_column(col)
        for e in book.entries():
            charged = e["history"] or e["planned_history"]
            detail.add_row(e["dataset_id"], e["run_id"], e["status"], e["unit"],
                           ", ".join(f"{h['noise_multiplier']:.4g}" for h in charged) or "-",
                           ", ".join(f"{h['sample_rate']:.4g}" for h in charged) or "-",
                           str(e["steps"]), _f(e["epsilon"]))
        console.print(detail)


@ledger_app.command("set-budget")
def set_budget(
    ledger: Annotated[Path, typer.Argument(help="The ledger's SQLite file (created if new).")],
    epsilon: Annotated[float, typer.Option("--epsilon", help="Total epsilon budget.")],
    data: Annotated[str | None, typer.Option("--data", help="Dataset to budget.")] = None,
    dataset_id: Annotated[str | None, typer.Option("--dataset-id")] = None,
    delta: Annotated[float | None, typer.Option("--delta")] = None,
    unit: Annotated[str, typer.Option(
        "--privacy-unit", help="With --data: the records the budget binds, patient, image "
        "or auto (patient whenever the data names them).")] = "auto",
) -> None:
    """Set (or change) the total privacy budget of a dataset.

    With --data the budget also binds the dataset's records (its patients, or images), in
    whatever file they are used later.
    """
    from privmed.data import load_data
    from privmed.errors import ConfigError
    from privmed.privacy import BudgetLedger, default_delta

    if (data is None) == (dataset_id is None):
        raise ConfigError("Name the dataset with exactly one of --data or --dataset-id.")
    records = None
    if data is not None:
        train = load_data(data).train
        records = train.privacy_records(unit)
        dataset_id = train.dataset_id
        delta = delta if delta is not None else default_delta(records.count)
    if delta is None:
        raise ConfigError("With --dataset-id, give --delta too.")
    BudgetLedger(ledger).set_budget(dataset_id, epsilon, delta, records=records)
    per = f", per {records.unit}, {records.count} {records.unit}s" if records else ""
    console.print(f"Dataset {dataset_id}: budget (ε = {epsilon:g}, δ = {delta:g}{per}) in "
                  f"{ledger}.")


def _f(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def _finite(value: object) -> object:
    """``value`` with infinite and NaN numbers as null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"
