"""Training: one ``fit()`` for central and federated use, metrics, checkpoints."""

from privmed.training.config import TrainConfig
from privmed.training.fit import FitResult, fit, plan_privacy
from privmed.training.metrics import compute_metrics, evaluate, predict_proba

__all__ = ["FitResult", "TrainConfig", "compute_metrics", "evaluate", "fit", "plan_privacy",
           "predict_proba"]
