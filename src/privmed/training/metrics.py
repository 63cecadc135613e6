"""Classification metrics as medical-imaging papers report them."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, matthews_corrcoef, roc_auc_score, roc_curve
from torch import nn

from privmed.data.dataset import ImageDataset


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax class probabilities, N x K, evaluated in inference mode."""
    was_training = model.training
    model.eval()
    chunks = [torch.softmax(model(images[i:i + batch_size]), dim=1)
              for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(chunks).double().numpy()


def compute_metrics(labels: np.ndarray, probs: np.ndarray, *, roc_points: int = 101) -> dict:
    """ACC, ROC-AUC, MCC, sensitivity, specificity, confusion matrix.

    Binary: sensitivity/specificity of class 1 (the finding) and the ROC curve
    (down-sampled to ``roc_points`` points). Multi-class: one-vs-rest macro
    ROC-AUC, macro recall as sensitivity and macro specificity.
    """
    labels = np.asarray(labels).astype(int)
    k = probs.shape[1]
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, labels=list(range(k)))
    present = np.unique(labels)
    out: dict = {
        "n": int(labels.size),
        "accuracy": float((preds == labels).mean()),
        "mcc": float(matthews_corrcoef(labels, preds)) if present.size > 1 else None,
        "confusion_matrix": cm.tolist(),
    }
    tp = np.diag(cm).astype(float)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / (tp + fn)
        spec = tn / (tn + fp)
    if k == 2:
        out["sensitivity"] = _nan_to_none(recall[1])
        out["specificity"] = _nan_to_none(spec[1])
        if present.size == 2:
            out["roc_auc"] = float(roc_auc_score(labels, probs[:, 1]))
            fpr, tpr, _ = roc_curve(labels, probs[:, 1])
            keep = np.unique(np.linspace(0, fpr.size - 1, min(roc_points, fpr.size)).astype(int))
            out["roc_curve"] = {"fpr": fpr[keep].round(5).tolist(),
                                "tpr": tpr[keep].round(5).tolist()}
        else:
            out["roc_auc"] = None
    else:
        out["sensitivity"] = _nan_to_none(np.nanmean(recall))
        out["specificity"] = _nan_to_none(np.nanmean(spec))
        if present.size == k:
            out["roc_auc"] = float(roc_auc_score(labels, probs, multi_class="ovr",
                                                 average="macro"))
        else:
            out["roc_auc"] = None
    return out


def evaluate(model: nn.Module, dataset: ImageDataset, batch_size: int = 512) -> dict:
    """Metrics of ``model`` on ``dataset``."""
    probs = predict_proba(model, dataset.images, batch_size)
    return compute_metrics(dataset.labels.numpy(), probs)


def _nan_to_none(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x
