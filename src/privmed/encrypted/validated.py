"""Sentences about a served model's validated performance and decisions, for the clinic
page and ``privmed infer``: the test AUC with its interval, sensitivity and specificity at
the operating point, which class is positive, and each decision against the threshold.
The model's outputs are uncalibrated scores and are never called probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UNRECORDED = ("No validated performance is recorded for this model (it was compiled before "
              "privmed recorded it), so how often its decisions are right is unknown here.")


def _ci(m: Mapping[str, Any], key: str) -> str:
    value, ci = m.get(key), m.get(f"{key}_ci")
    if value is None:
        return "not defined"
    return f"{value:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def decision_rule(card: Mapping[str, Any]) -> str:
    """How the model decides, e.g. "opacity when its score is at least 0.412, a threshold
    chosen by Youden's J on the validation split"."""
    op = card.get("operating_point")
    if op and len(card.get("class_names") or []) == 2:
        how = {"youden": "chosen by Youden's J on the validation split",
               "sensitivity": f"chosen for sensitivity >= {op.get('target')} on the "
                              "validation split",
               "specificity": f"chosen for specificity >= {op.get('target')} on the "
                              "validation split",
               "fixed": "fixed by the model's trainer"}.get(op.get("method"),
                                                            "by default, not tuned")
        return (f"{op['positive_class']} when its score is at least {op['threshold']:.3f}, "
                f"a threshold {how}")
    return "the class with the highest score"


def performance_text(card: Mapping[str, Any]) -> str:
    """The model's validated performance in one or two sentences."""
    perf = card.get("performance")
    if not perf:
        return UNRECORDED
    names = list(card.get("class_names") or [])
    split = "test" if perf.get("split") == "test" else str(perf.get("split"))
    head = f"Validated on {perf.get('n')} {split} images"
    if perf.get("positive_class"):
        positive = perf["positive_class"]
        negative = next((c for c in names if c != positive), "the other class")
        return (f"{head}: ROC-AUC {_ci(perf, 'roc_auc')}. Positive class: {positive}. "
                f"Decision: {decision_rule(card)}. At that threshold: sensitivity "
                f"{_ci(perf, 'sensitivity')} for {positive}, specificity "
                f"{_ci(perf, 'specificity')} for {negative}.")
    macro = (perf.get("macro") or {}).get("roc_auc")
    auc = f", one-vs-rest ROC-AUC (macro) {macro:.3f}" if macro is not None else ""
    return (f"{head}: accuracy {_ci(perf, 'accuracy')}{auc}. Decision: "
            f"{decision_rule(card)}.")


def decision_text(label: str, score: float, threshold: float | None,
                  positive: str | None) -> str:
    """Why this image got its decision, e.g. "opacity: its score 0.731 is at least the
    threshold 0.412"."""
    if threshold is not None and positive is not None:
        relation = "at least" if score >= threshold else "below"
        return (f"{label}: the score for {positive} is {score:.3f}, {relation} the "
                f"threshold {threshold:.3f}.")
    return f"{label}: the highest score, {score:.3f} (a score, not a probability)."
