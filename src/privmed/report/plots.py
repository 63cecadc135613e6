"""PNG plots for the run report.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg
canvas instead of pyplot: nothing touches pyplot's global figure list or the
process-wide backend, so rendering a report inside a notebook or a server
neither leaks figures nor changes the user's backend. Every function returns
PNG bytes, or None when the results hold nothing to plot.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, bound to this figure only
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" stamp: identical results give byte-identical PNGs.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _nan(value: Any) -> float:
    """None (NaN written as null) -> NaN so matplotlib leaves a gap."""
    return math.nan if value is None else float(value)


def roc_figure(metrics: Mapping[str, Any]) -> bytes | None:
    """ROC curve of every split that has ``roc_curve`` (binary tasks), AUC in the legend."""
    curves = [(split, m) for split, m in metrics.items()
              if isinstance(m, Mapping) and m.get("roc_curve")]
    if not curves:
        return None
    fig = _new_figure(4.8, 4.2)
    ax = fig.add_subplot()
    positive = next((m.get("positive_class") for _, m in curves if m.get("positive_class")),
                    None)
    for split, m in curves:
        auc = m.get("roc_auc")
        label = f"{split} (AUC = {auc:.3f})" if auc is not None else split
        line, = ax.plot(m["roc_curve"]["fpr"], m["roc_curve"]["tpr"], label=label,
                        linewidth=1.8)
        sens, spec, thr = m.get("sensitivity"), m.get("specificity"), m.get("threshold")
        if sens is not None and spec is not None and thr is not None:
            # The operating point: where the chosen threshold puts this split.
            ax.plot([1 - spec], [sens], marker="o", markersize=8, color=line.get_color(),
                    markeredgecolor="black", linestyle="none",
                    label=f"{split} at threshold {thr:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 − specificity)",
           ylabel="True positive rate (sensitivity)",
           title=f"ROC curve, positive class {positive}" if positive else "ROC curve")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def multiclass_roc_figure(metrics: Mapping[str, Any], split: str = "test") -> bytes | None:
    """One-vs-rest ROC curve of each class on ``split`` (else the first split that has
    them), AUC in the legend; None for binary tasks."""
    m = metrics.get(split) if isinstance(metrics.get(split), Mapping) else None
    if not m or not m.get("roc_curves"):
        split, m = next(((s, x) for s, x in metrics.items()
                         if isinstance(x, Mapping) and x.get("roc_curves")), (split, None))
    if not m:
        return None
    aucs = {c["class"]: c.get("roc_auc") for c in m.get("per_class", [])}
    fig = _new_figure(5.6, 4.6)
    ax = fig.add_subplot()
    for curve in m["roc_curves"]:
        auc = aucs.get(curve["class"])
        ax.plot(curve["fpr"], curve["tpr"], linewidth=1.6,
                label=f"{curve['class']} (AUC = {auc:.3f})" if auc is not None
                else curve["class"])
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (other classes)",
           ylabel="True positive rate (recall of the class)",
           title=f"One-vs-rest ROC curves ({split})")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def training_figure(epochs: Sequence[Mapping[str, Any]], *, federated: bool = False
                    ) -> bytes | None:
    """Training loss and validation AUC / accuracy per epoch, side by side; ``federated``:
    per round, scored on the coordinator's held-out test set."""
    if not epochs:
        return None
    unit = "Round" if federated else "Epoch"
    x = [e["epoch"] for e in epochs]
    fig = _new_figure(8.0, 3.4)
    ax_loss, ax_val = fig.subplots(1, 2)
    loss = [_nan(e.get("loss")) for e in epochs]
    ax_loss.plot(x, loss, marker="o", color="tab:red")
    ax_loss.set(xlabel=unit, ylabel="Training loss", title="Loss")
    if federated and all(math.isnan(v) for v in loss):  # no empty axes with made-up ticks
        ax_loss.tick_params(labelbottom=False, labelleft=False, length=0)
        ax_loss.text(0.5, 0.5, "the sites' losses are hidden\n(secure aggregation)",
                     ha="center", va="center", transform=ax_loss.transAxes, color="grey")
    val_auc = [_nan(e.get("val_auc")) for e in epochs]
    val_acc = [_nan(e.get("val_accuracy")) for e in epochs]
    if all(math.isnan(v) for v in val_auc + val_acc):
        ax_val.text(0.5, 0.5, "no validation split", ha="center", va="center",
                    transform=ax_val.transAxes, color="grey")
    else:
        ax_val.plot(x, val_auc, marker="o", label="ROC-AUC")
        ax_val.plot(x, val_acc, marker="s", linestyle=":", label="accuracy (argmax)")
        ax_val.legend(loc="lower right")
    ax_val.set(xlabel=unit, ylabel="Held-out test score" if federated else "Validation score",
               ylim=(0, 1.02), title="Held-out test (coordinator)" if federated else "Validation")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def epsilon_figure(privacy: Mapping[str, Any]) -> bytes | None:
    """Privacy spent (epsilon) against optimiser steps, with the target and the
    dataset's ledger budget as dashed lines when known; None for non-private runs."""
    curve = [p for p in privacy.get("epsilon_curve") or [] if p.get("epsilon") is not None]
    if not privacy.get("enabled") or not curve:
        return None
    fig = _new_figure(4.8, 3.4)
    ax = fig.add_subplot()
    per_round = all("round" in p for p in curve)  # federated: the largest site ε per round
    steps = [p["round" if per_round else "steps"] for p in curve]
    eps = [p["epsilon"] for p in curve]
    if steps[0] > 0:  # no steps taken, no privacy spent
        steps, eps = [0, *steps], [0.0, *eps]
    name = "largest site ε" if per_round else "ε"
    ax.plot(steps, eps, marker=".",
            label=f"{name} (δ = {privacy.get('delta'):.3g})" if privacy.get("delta") else name)
    target = privacy.get("target_epsilon")
    if target is not None:
        ax.axhline(target, linestyle="--", color="tab:orange", label=f"target ε = {target:g}")
    ledger = privacy.get("ledger")
    if ledger and ledger.get("budget_epsilon") is not None:
        ax.axhline(ledger["budget_epsilon"], linestyle="--", color="tab:red",
                   label=f"dataset budget ε = {ledger['budget_epsilon']:g}")
    ax.set(xlabel="Rounds" if per_round else "Optimiser steps", ylabel="ε spent",
           title="Privacy budget",
           xlim=(0, None), ylim=(0, None))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _png(fig)


def membership_figure(membership: Mapping[str, Any]) -> bytes | None:
    """Log-log ROC of each membership attack (as the field reports them), with chance
    and the line TPR = e^ε·FPR + δ for the claimed ε."""
    attacks = [(name, membership[key]) for key, name in
               (("lira", "LiRA (online)" if membership.get("attack") == "lira-online"
                 else "LiRA (offline)"), ("loss", "LOSS"))
               if isinstance(membership.get(key), Mapping) and membership[key].get("fpr")]
    if not attacks:
        return None
    fig = _new_figure(4.8, 4.2)
    ax = fig.add_subplot()
    lo = 1.0
    for name, m in attacks:
        fpr, tpr = m["fpr"], [max(t, 1e-5) for t in m["tpr"]]
        lo = min(lo, min(f for f in fpr if f > 0))
        auc = m.get("auc")
        ax.loglog(fpr, tpr, label=f"{name}, AUC {auc:.3f}" if auc is not None else name)
    grid = [lo * (1 / lo) ** (i / 50) for i in range(51)]
    ax.loglog(grid, grid, linestyle="--", color="grey", linewidth=1, label="chance")
    eps, delta = membership.get("claimed_epsilon"), membership.get("delta") or 0.0
    if eps is not None:
        bound = [min(1.0, math.exp(eps) * f + delta) for f in grid]
        ax.loglog(grid, bound, linestyle=":", color="tab:red",
                  label=f"DP bound, claimed ε = {eps:.2f}")
    ax.set(xlim=(lo, 1), ylim=(max(lo / 10, 1e-5), 1.05), xlabel="False positive rate",
           ylabel="True positive rate", title="Membership inference (log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)
