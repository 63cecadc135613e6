"""What the federated commands (``coordinator``, ``federate``, ``simulate``, ``demo``) print:
the rounds as they come and the results at the end. Printing only; the commands get
everything they print from the library."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from privmed.cli.app import console


def say(line: str) -> None:
    """A progress line from the library, printed as it is (no highlighting)."""
    console.print(line, highlight=False)


@contextmanager
def round_progress(total: int) -> Iterator[Callable[[dict], None]]:
    """A progress bar over ``total`` federated rounds while the block runs; yields the
    callback that takes each round's record (``rounds.jsonl``) and shows it, with a line
    for every node that did not take part."""
    progress = Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                        console=console)
    task = progress.add_task("rounds", total=total, info="waiting for the first round")

    def on_round(record: dict) -> None:
        eps = [n["epsilon"] for n in record["nodes"] if n.get("epsilon") is not None]
        info = (f"round {record['round']}: {record['contributors']}/{len(record['nodes'])} "
                f"nodes, held-out AUC {record['heldout_auc'] or float('nan'):.3f}"
                + (f", ε ≤ {max(eps):.2f}" if eps else "")
                + ("" if record["status"] == "ok" else " [red](failed)[/]"))
        for n in record["nodes"]:
            if n["status"] != "ok":
                progress.console.print(f"[yellow]Round {record['round']}: {n['node']} "
                                       f"{n['status']}: {n['reason']}[/]")
        progress.update(task, completed=record["round"], info=info)

    with progress:
        yield on_round


def print_federated_results(results: dict, out: Path) -> None:
    """The global model's held-out metrics, the weakest site's (ε, δ), each site's (all
    sites up to 10, else the range) and the report's path."""
    test = results["metrics"]["test"]
    privacy = results["privacy"]
    rows = privacy.get("per_node", [])
    # The weakest site's guarantee: max epsilon and max delta, each over the sites.
    eps = (f"weakest site (ε = {privacy['epsilon']:.2f}, δ = {privacy['delta']:g}), the "
           f"largest ε and δ over the {len(rows)} sites that took part"
           if privacy["enabled"] else "no DP")

    def f(key: str) -> str:
        return "n/a" if test.get(key) is None else f"{test[key]:.3f}"

    console.print(f"Global model on the held-out test set: ROC-AUC {f('roc_auc')}, ACC "
                  f"{f('accuracy')}, MCC {f('mcc')}; {eps}.")
    if len(rows) > 10:
        epsilons = [r["epsilon"] for r in rows]
        console.print(f"  {len(rows)} nodes: ε from {min(epsilons):.2f} to "
                      f"{max(epsilons):.2f} (each listed in results.json and the report)")
    for row in rows if len(rows) <= 10 else []:
        console.print(f"  {row['node']}: (ε = {row['epsilon']:.2f}, δ = {row['delta']:g}) "
                      f"after {row['rounds_trained']} rounds")
    console.print(f"Report: [bold]{out / 'report.html'}[/]")
