"""Classification metrics as medical-imaging papers report them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import (
    cohen_kappa_score,
    confusion_matrix,
    matthews_corrcoef,
    roc_auc_score,
    roc_curve,
)
from torch import nn

from privmed.data.dataset import ImageDataset
from privmed.training.decision import DEFAULT_THRESHOLD, OperatingPoint, default_positive_class
from privmed.training.intervals import auc_ci, wilson_ci


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax class probabilities, N x K, evaluated in inference mode."""
    was_training = model.training
    model.eval()
    chunks = [torch.softmax(model(images[i:i + batch_size]), dim=1)
              for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(chunks).double().numpy()


def compute_metrics(labels: np.ndarray, probs: np.ndarray, *, roc_points: int = 101,
                    class_names: Sequence[str] | None = None,
                    operating_point: OperatingPoint | None = None) -> dict:
    """Metrics of softmax outputs ``probs`` (N x K) against ``labels``, with 95 % CIs.

    Binary: everything at ``operating_point`` (positive class and threshold; without one,
    the class named like a finding, else the second, at 0.5) and the ROC curve of the
    positive class's score, down-sampled to ``roc_points`` points. Multi-class: argmax
    decisions, per-class recall / precision / one-vs-rest AUC, their macro and
    support-weighted averages and the quadratic weighted kappa; ``sensitivity`` and
    ``specificity`` are None (they are defined for one positive class only).
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    names = [str(c) for c in class_names] if class_names is not None else \
        [f"class_{i}" for i in range(k)]
    if k == 2:
        return _binary(labels, probs, names, operating_point, roc_points)
    return _multiclass(labels, probs, names, roc_points)


def _common(labels: np.ndarray, preds: np.ndarray, k: int) -> dict:
    correct = int((preds == labels).sum())
    return {
        "n": int(labels.size),
        "accuracy": correct / labels.size,
        "accuracy_ci": wilson_ci(correct, labels.size),
        "mcc": float(matthews_corrcoef(labels, preds)) if np.unique(labels).size > 1 else None,
        "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(k))).tolist(),
    }


def _binary(labels: np.ndarray, probs: np.ndarray, names: list[str],
            op: OperatingPoint | None, roc_points: int) -> dict:
    assumed = False
    if op is None:
        pos, assumed = default_positive_class(names)
        op = OperatingPoint(pos, names[pos], DEFAULT_THRESHOLD, "default")
    pos, neg = op.positive_index, 1 - op.positive_index
    preds = op.predict(probs)
    out = _common(labels, preds, 2)
    cm = np.asarray(out["confusion_matrix"])
    tp, fn, tn, fp = (int(cm[pos, pos]), int(cm[pos, neg]), int(cm[neg, neg]),
                      int(cm[neg, pos]))
    out.update({
        "positive_class": op.positive_class,
        "threshold": op.threshold,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "sensitivity_ci": wilson_ci(tp, tp + fn),
        "specificity": tn / (tn + fp) if tn + fp else None,
        "specificity_ci": wilson_ci(tn, tn + fp),
    })
    if assumed:
        out["positive_class_assumed"] = True
    y, scores = (labels == pos).astype(int), probs[:, pos]
    if 0 < y.sum() < y.size:
        out["roc_auc"] = float(roc_auc_score(y, scores))
        out["roc_auc_ci"] = auc_ci(y, scores)
        out["roc_curve"] = _roc(y, scores, roc_points)
    else:
        out["roc_auc"], out["roc_auc_ci"] = None, None
    return out


def _multiclass(labels: np.ndarray, probs: np.ndarray, names: list[str],
                roc_points: int) -> dict:
    k = len(names)
    preds = probs.argmax(axis=1)
    out = _common(labels, preds, k)
    cm = np.asarray(out["confusion_matrix"])
    per_class, curves = [], []
    for c in range(k):
        tp, support, predicted = int(cm[c, c]), int(cm[c].sum()), int(cm[:, c].sum())
        y = (labels == c).astype(int)
        row = {"class": names[c], "support": support,
               "recall": tp / support if support else None,
               "recall_ci": wilson_ci(tp, support),
               "precision": tp / predicted if predicted else None,
               "precision_ci": wilson_ci(tp, predicted),
               "roc_auc": None, "roc_auc_ci": None}
        if 0 < y.sum() < y.size:
            row["roc_auc"] = float(roc_auc_score(y, probs[:, c]))
            row["roc_auc_ci"] = auc_ci(y, probs[:, c])
            curves.append({"class": names[c], **_roc(y, probs[:, c], roc_points)})
        per_class.append(row)
    supports = np.array([r["support"] for r in per_class], dtype=float)
    averages = {}
    for how in ("macro", "weighted"):
        averages[how] = {key: _average([r[key] for r in per_class], supports, how)
                         for key in ("recall", "precision", "roc_auc")}
    kappa = cohen_kappa_score(labels, preds, weights="quadratic", labels=list(range(k)))
    out.update({
        "roc_auc": averages["macro"]["roc_auc"],  # macro one-vs-rest, as before
        "sensitivity": None, "specificity": None,
        "per_class": per_class, "macro": averages["macro"], "weighted": averages["weighted"],
        "quadratic_weighted_kappa": _nan_to_none(kappa),
        "roc_curves": curves,
    })
    return out


def _average(values: list[float | None], supports: np.ndarray, how: str) -> float | None:
    """Macro: the plain mean over classes; weighted: by each class's test images. None
    when a class that counts has no value (a wrong average is worse than none)."""
    weights = np.ones_like(supports) if how == "macro" else supports
    if weights.sum() == 0 or any(v is None for v, w in zip(values, weights, strict=True)
                                 if w > 0):
        return None
    return float(sum(v * w for v, w in zip(values, weights, strict=True) if w > 0)
                 / weights.sum())


def _roc(y: np.ndarray, scores: np.ndarray, points: int) -> dict:
    fpr, tpr, _ = roc_curve(y, scores)
    keep = np.unique(np.linspace(0, fpr.size - 1, min(points, fpr.size)).astype(int))
    return {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}


def predict_dataset(model: nn.Module, dataset: ImageDataset, batch_size: int = 512
                    ) -> np.ndarray:
    """Softmax outputs on ``dataset``; a model's fixed front end (scattering) runs once per
    dataset content and is cached, as in training."""
    fixed = getattr(model, "fixed_features", None)
    if fixed is not None and hasattr(model, "head"):
        from privmed.training.features import fixed_feature_dataset

        return predict_proba(model.head, fixed_feature_dataset(fixed, dataset).images,
                             batch_size)
    return predict_proba(model, dataset.images, batch_size)


def evaluate(model: nn.Module, dataset: ImageDataset, batch_size: int = 512, *,
             operating_point: OperatingPoint | None = None) -> dict:
    """Metrics of ``model`` on ``dataset`` (binary: at ``operating_point``)."""
    probs = predict_dataset(model, dataset, batch_size)
    return compute_metrics(dataset.labels.numpy(), probs, class_names=dataset.class_names,
                           operating_point=operating_point)


PERFORMANCE_KEYS = ("n", "accuracy", "accuracy_ci", "roc_auc", "roc_auc_ci", "positive_class",
                    "threshold", "sensitivity", "sensitivity_ci", "specificity",
                    "specificity_ci", "macro", "weighted", "quadratic_weighted_kappa")


def performance_summary(metrics: dict, split: str = "test") -> dict | None:
    """The validated performance a model travels with (model file, encrypted model card):
    ``split``'s headline figures and intervals, or None when it was not evaluated."""
    m = metrics.get(split)
    if not m:
        return None
    return {"split": split, **{k: m[k] for k in PERFORMANCE_KEYS if k in m}}


def _nan_to_none(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x
