"""Realistic results dicts shared by the report tests (not a test module)."""

from __future__ import annotations

import copy

from privmed.report import SCHEMA_VERSION, environment_info

_BINARY_ROC = {"fpr": [0.0, 0.0, 0.1, 0.25, 0.5, 1.0], "tpr": [0.0, 0.4, 0.7, 0.85, 0.95, 1.0]}


def _metrics(n: int, acc: float, auc: float | None, cm: list[list[int]], roc: bool) -> dict:
    m = {"n": n, "accuracy": acc, "roc_auc": auc, "mcc": 0.6021, "sensitivity": 0.8412,
         "specificity": 0.7733, "confusion_matrix": cm}
    if roc:
        m["roc_curve"] = copy.deepcopy(_BINARY_ROC)
    return m


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
        "environment": environment_info(),
    }
