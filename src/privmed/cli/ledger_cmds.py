"""``privmed ledger show | set-budget``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from privmed.cli.app import console, ledger_app


@ledger_app.command("show")
def show(
    ledger: Annotated[Path, typer.Argument(help="The ledger's SQLite file.")],
    runs: Annotated[bool, typer.Option("--runs", help="List every spend, too.")] = False,
) -> None:
    """Budget, spent and remaining epsilon per dataset."""
    from privmed.errors import DataError
    from privmed.privacy import BudgetLedger

    if not ledger.exists():
        raise DataError(f"Ledger {ledger} does not exist.")
    book = BudgetLedger(ledger)
    table = Table(title=f"Privacy budget ledger {ledger}")
    for col in ("dataset", "budget ε", "δ", "spent ε", "remaining ε", "runs"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for row in book.summary():
        remaining = row["remaining"] if row["epsilon"] is not None else None
        table.add_row(row["dataset_id"], _f(row["epsilon"]), _g(row["delta"]),
                      _f(row["spent"]), _f(remaining), str(row["runs"]))
    console.print(table)
    if runs:
        detail = Table(title="Spends")
        for col in ("dataset", "run", "status", "σ", "q", "steps", "ε alone"):
            detail.add_column(col)
        for e in book.entries():
            charged = e["history"] or e["planned_history"]
            detail.add_row(e["dataset_id"], e["run_id"], e["status"],
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
) -> None:
    """Set (or change) the total privacy budget of a dataset."""
    from privmed.data import load_data
    from privmed.errors import ConfigError
    from privmed.privacy import BudgetLedger, default_delta

    if (data is None) == (dataset_id is None):
        raise ConfigError("Name the dataset with exactly one of --data or --dataset-id.")
    if data is not None:
        train = load_data(data).train
        dataset_id, n = train.dataset_id, len(train)
        delta = delta if delta is not None else default_delta(n)
    if delta is None:
        raise ConfigError("With --dataset-id, give --delta too.")
    BudgetLedger(ledger).set_budget(dataset_id, epsilon, delta)
    console.print(f"Dataset {dataset_id}: budget (ε = {epsilon:g}, δ = {delta:g}) in {ledger}.")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"
