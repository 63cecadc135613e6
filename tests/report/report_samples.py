"""Realistic results dicts shared by the report tests (not a test module)."""

from __future__ import annotations

import copy

from privmed.report import SCHEMA_VERSION, environment_info

_BINARY_ROC = {"fpr": [0.0, 0.0, 0.1, 0.25, 0.5, 1.0], "tpr": [0.0, 0.4, 0.7, 0.85, 0.95, 1.0]}


def _metrics(n: int, acc: float, auc: float | None, cm: list[list[int]], roc: bool) -> dict:
    """Binary (``roc``): at the positive class "opacity" and threshold 0.4123, with CIs;
    multi-class: per-class figures, named averages, kappa and one-vs-rest curves."""
    m = {"n": n, "accuracy": acc, "accuracy_ci": [acc - 0.05, acc + 0.04], "roc_auc": auc,
         "mcc": 0.6021, "confusion_matrix": cm}
    if roc:
        m.update({"roc_auc_ci": [auc - 0.04, auc + 0.03] if auc is not None else None,
                  "positive_class": "opacity", "threshold": 0.4123,
                  "sensitivity": 0.8412, "sensitivity_ci": [0.7751, 0.8912],
                  "specificity": 0.7733, "specificity_ci": [0.7001, 0.8331],
                  "roc_curve": copy.deepcopy(_BINARY_ROC)})
        return m
    names = ("normal", "opacity", "effusion")
    m.update({
        "sensitivity": None, "specificity": None,
        "per_class": [{"class": c, "support": sum(cm[i]), "recall": cm[i][i] / sum(cm[i]),
                       "recall_ci": [0.7, 0.9], "precision": 0.81, "precision_ci": [0.72, 0.88],
                       "roc_auc": 0.9, "roc_auc_ci": [0.85, 0.95]}
                      for i, c in enumerate(names)],
        "macro": {"recall": 0.8166, "precision": 0.81, "roc_auc": auc},
        "weighted": {"recall": acc, "precision": 0.8122, "roc_auc": 0.8702},
        "quadratic_weighted_kappa": 0.7351,
        "roc_curves": [{"class": c, **copy.deepcopy(_BINARY_ROC)} for c in names],
    })
    return m


_OPERATING_POINT = {
    "positive_index": 1, "positive_class": "opacity", "threshold": 0.4123, "method": "youden",
    "target": None, "chosen_on": "val", "n": 300, "val_sensitivity": 0.85,
    "val_specificity": 0.78, "note": None,
    "score": "softmax output of the positive class: an uncalibrated score, not a probability",
    "within_dp_guarantee": False,
    "privacy_note": "The threshold was chosen on the validation split, which is private "
                    "data, outside the DP guarantee (like model selection).",
}


def make_legacy_results(kind: str = "binary") -> dict:
    """A ``privmed.results/1`` file as privmed wrote it before positive classes, operating
    points and intervals (``binary`` or ``multiclass``)."""
    r = make_results(kind)
    r["schema"] = "privmed.results/1"
    r.pop("operating_point", None)
    for m in r["metrics"].values():
        for key in [k for k in m if k.endswith("_ci") or k in (
                "positive_class", "threshold", "per_class", "macro", "weighted",
                "quadratic_weighted_kappa", "roc_curves")]:
            del m[key]
        if kind == "multiclass":  # /1 put macro recall and specificity here
            m["sensitivity"], m["specificity"] = 0.8166, 0.9083
    return r


def make_results(kind: str = "binary") -> dict:
    """``binary`` (DP, ROC curves), ``multiclass`` (DP, no ROC curves) or ``nodp``."""
    multiclass = kind == "multiclass"
    classes = ["normal", "opacity", "effusion"] if multiclass else ["normal", "opacity"]
    if multiclass:
        cm_val = [[90, 5, 5], [10, 80, 10], [5, 15, 80]]
        cm_test = [[85, 10, 5], [10, 82, 8], [4, 16, 80]]
    else:
        cm_val = [[120, 30], [26, 124]]
        cm_test = [[118, 32], [29, 121]]
    dp = kind != "nodp"
    epochs = [
        {"epoch": e, "steps": 5, "loss": 0.69 - 0.05 * e, "val_auc": 0.70 + 0.04 * e,
         "val_accuracy": 0.60 + 0.04 * e, "epsilon": 0.9 + 0.42 * e if dp else None,
         "seconds": 3.1}
        for e in range(1, 6)
    ]
    if dp:
        privacy = {
            "enabled": True, "epsilon": 2.98, "delta": 1e-5, "accountant": "prv",
            "target_epsilon": 3.0, "noise_multiplier": 1.1, "max_grad_norm": 1.0,
            "sample_rate": 0.2,
            "history": [{"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 25}],
            "epsilon_curve": [{"steps": s, "epsilon": round(0.12 * s, 3)}
                              for s in (5, 10, 15, 20, 25)],
            "ledger": {"path": "/tmp/ledger.sqlite", "dataset_id": "1a2b3c4d5e6f7a8b",
                       "budget_epsilon": 8.0, "spent_epsilon": 2.98,
                       "remaining_epsilon": 5.02},
        }
    else:
        privacy = {"enabled": False, "epsilon": None, "delta": None, "accountant": None,
                   "target_epsilon": None, "noise_multiplier": None, "max_grad_norm": None,
                   "sample_rate": None, "history": [], "epsilon_curve": [], "ledger": None}
    return {
        "schema": SCHEMA_VERSION,
        "privmed_version": "0.1.0",
        "created": "2026-11-22T03:00:00Z",
        "command": "privmed train --data synthetic --epsilon 3",
        "seed": 0,
        "data": {"source": "synthetic", "dataset_id": "1a2b3c4d5e6f7a8b", "classes": classes,
                 "image_shape": [1, 28, 28], "sizes": {"train": 1200, "val": 300, "test": 300}},
        "model": {"name": "small-cnn", "parameters": 12345},
        "training": {
            "config": {"epochs": 5, "batch_size": 240, "lr": 0.002, "optimizer": "adam",
                       "ema_decay": 0.9, "checkpoint_dir": None, "seed": 0},
            "epochs": epochs,
            "seconds": 15.5,
        },
        "privacy": privacy,
        "metrics": {
            "val": _metrics(300, 0.8133, 0.8871 if multiclass else 0.9012, cm_val, not multiclass),
            "test": _metrics(300, 0.7967, 0.8755 if multiclass else 0.8876, cm_test,
                             not multiclass),
        },
        **({} if multiclass else {"operating_point": copy.deepcopy(_OPERATING_POINT)}),
        "environment": environment_info(),
    }
