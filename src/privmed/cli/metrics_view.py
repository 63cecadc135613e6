"""Console tables of a run's metrics: positive class, operating point, 95 % CIs, per class.

Shared by ``privmed train`` (and the demo) and ``privmed evaluate``; every sensitivity and
specificity printed names the class it is about and the threshold it was taken at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from privmed.training.decision import OperatingPoint


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def with_ci(m: Mapping[str, Any], key: str) -> str:
    """``0.812 (0.735-0.896)``; a dash where the value (or just the interval) is undefined."""
    value, ci = m.get(key), m.get(f"{key}_ci")
    if value is None:
        return "-"
    return fmt(value) if not ci else f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


def _table(title: str, splits: list[str]) -> Table:
    """Metrics down, splits across: stays readable in an 80-column terminal, and a cell
    that does not fit is folded onto the next line, never cut short."""
    table = Table(title=title)
    table.add_column("metric", overflow="fold")
    for split in splits:
        table.add_column(split, justify="right", overflow="fold")
    return table


def _binary_table(metrics: Mapping[str, Mapping], title: str,
                  classes: list[str] | None) -> Table:
    positive = next((m.get("positive_class") for m in metrics.values()
                     if m.get("positive_class")), None)
    others = [c for c in classes or [] if c != positive]
    negative = escape(others[0]) if len(others) == 1 else "the other class"
    positive = escape(str(positive))
    table = _table(title, list(metrics))
    ms = list(metrics.values())
    table.add_row("images", *(str(m.get("n", "-")) for m in ms))
    table.add_row("ROC-AUC (95% CI)", *(with_ci(m, "roc_auc") for m in ms))
    table.add_row(f"sensitivity: recall of {positive} (95% CI)",
                  *(with_ci(m, "sensitivity") for m in ms))
    table.add_row(f"specificity: recall of {negative} (95% CI)",
                  *(with_ci(m, "specificity") for m in ms))
    table.add_row("accuracy (95% CI)", *(with_ci(m, "accuracy") for m in ms))
    table.add_row("MCC", *(fmt(m.get("mcc")) for m in ms))
    table.add_row(f"threshold on the {positive} score", *(fmt(m.get("threshold")) for m in ms))
    return table


def _multiclass_tables(metrics: Mapping[str, Mapping], title: str) -> list[Table]:
    table = _table(title, list(metrics))
    ms = list(metrics.values())

    def avg(how: str, key: str) -> list[str]:
        return [fmt((m.get(how) or {}).get(key)) for m in ms]

    table.add_row("images", *(str(m.get("n", "-")) for m in ms))
    table.add_row("accuracy (95% CI)", *(with_ci(m, "accuracy") for m in ms))
    table.add_row("ROC-AUC one-vs-rest, macro", *avg("macro", "roc_auc"))
    table.add_row("ROC-AUC one-vs-rest, weighted", *avg("weighted", "roc_auc"))
    table.add_row("recall, macro", *avg("macro", "recall"))
    table.add_row("recall, weighted", *avg("weighted", "recall"))
    table.add_row("precision, macro", *avg("macro", "precision"))
    table.add_row("precision, weighted", *avg("weighted", "precision"))
    table.add_row("MCC", *(fmt(m.get("mcc")) for m in ms))
    table.add_row("quadratic weighted kappa", *(fmt(m.get("quadratic_weighted_kappa"))
                                                for m in ms))
    tables = [table]
    split = "test" if "test" in metrics else next(iter(metrics))
    rows = metrics[split].get("per_class") or []
    if rows:
        per = Table(title=f"Per class ({split})")
        for col in ("class", "images", "recall (95% CI)", "precision (95% CI)",
                    "AUC one-vs-rest (95% CI)"):
            per.add_column(col, justify="left" if col == "class" else "right",
                           overflow="fold")
        for c in rows:
            per.add_row(escape(c["class"]), str(c["support"]), with_ci(c, "recall"),
                        with_ci(c, "precision"), with_ci(c, "roc_auc"))
        tables.append(per)
    return tables


def print_metrics(console: Console, metrics: Mapping[str, Mapping], title: str = "Results",
                  classes: list[str] | None = None) -> None:
    """The metrics table(s) of one or more splits."""
    if not metrics:
        return
    binary = any("positive_class" in m for m in metrics.values()) or (
        classes is not None and len(classes) == 2)
    if binary:
        console.print(_binary_table(metrics, title, classes))
        return
    for table in _multiclass_tables(metrics, title):
        console.print(table)
    if classes:
        console.print("Macro: plain mean over classes; weighted: by each class's images. "
                      "Quadratic weighted kappa is meaningful only if the classes are ordered "
                      f"grades in this order: {escape(' < '.join(classes))}.")


def operating_point_line(op: Mapping[str, Any] | None) -> str | None:
    """One or two sentences: the decision rule and, when it came from data, its privacy."""
    if not op:
        return None
    point = OperatingPoint.from_dict(dict(op))
    text = (f"Operating point: '{escape(point.positive_class)}' when its score "
            f"(softmax output, not a calibrated probability) is at least {point.threshold:.3f}"
            f", {point.describe()}.")
    if op.get("note"):
        text += f" Note: {escape(str(op['note']))}."
    if not point.within_dp_guarantee:
        text += (" The threshold is outside the DP guarantee: it was chosen on the private "
                 "validation split, like model selection.")
    return text
