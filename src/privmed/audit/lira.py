"""LiRA's and LOSS's scores from logits (Carlini et al. 2022; Yeom et al. 2018).

Pure functions of the target's and the shadow models' outputs: which examples are IN for
which shadow (``keep``, shadows x examples) is drawn in :mod:`privmed.audit.membership`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from privmed.errors import ConfigError

#: Below this many shadow models per side (IN / OUT), one variance is pooled over all examples.
PER_EXAMPLE_VARIANCE_FROM = 32


def scaled_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's ``phi = log p_y - log sum_{y' != y} p_y'``, computed stably from logits."""
    logits, rows = np.asarray(logits, dtype=np.float64), np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - np.logaddexp.reduce(others, axis=1)


def loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Minus the cross-entropy loss, ``log p_y``: the LOSS attack's score (higher = member)."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[np.arange(len(labels)), labels] - np.logaddexp.reduce(logits, axis=1)



def _gaussian(phi: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: mean, squared deviations and count of ``phi`` (shadows x n) in ``mask``."""
    count = mask.sum(axis=0)
    if (count == 0).any():
        raise ConfigError("Every example needs at least one shadow model on each side; "
                          "use more shadow models.")
    mean = np.where(mask, phi, 0.0).sum(axis=0) / count
    return mean, np.where(mask, (phi - mean) ** 2, 0.0), count


def _std(phi: np.ndarray, masks: list[np.ndarray], pooled: bool) -> list[np.ndarray]:
    """Per-example std for each mask, or one within-example std pooled over all of them.

    Pooled, IN and OUT share one variance (as in the paper's fixed-variance code), so the
    online likelihood ratio is monotone in ``phi``; per-example variances need >= 2 each.
    """
    fits = [_gaussian(phi, m) for m in masks]
    if not pooled and all((c >= 2).all() for _, _, c in fits):
        return [np.maximum(np.sqrt(d.sum(axis=0) / (c - 1)), 1e-6) for _, d, c in fits]
    dof = sum(int(c.sum() - c.size) for _, _, c in fits)
    if dof > 0:
        std = math.sqrt(sum(float(d.sum()) for _, d, _ in fits) / dof)
    else:  # one shadow per side: the spread over all examples is all there is
        std = float(np.std(np.concatenate([phi[m] for m in masks])))
    return [np.full(phi.shape[1], max(std, 1e-6)) for _ in masks]


def pooled_variance(keep: np.ndarray, global_variance: bool | None) -> bool:
    """``global_variance``, or (None) whether some example has fewer than
    :data:`PER_EXAMPLE_VARIANCE_FROM` shadows on one side."""
    if global_variance is not None:
        return global_variance
    return int(min(keep.sum(axis=0).min(), (~keep).sum(axis=0).min())) < PER_EXAMPLE_VARIANCE_FROM


def lira_offline(target_phi: np.ndarray, shadow_phi: np.ndarray, keep: np.ndarray, *,
                 global_variance: bool | None = None) -> np.ndarray:
    """Offline LiRA: ``-log P[Z > phi]`` with ``Z ~ N(mu_out, sigma_out^2)`` per example."""
    mean = _gaussian(shadow_phi, ~keep)[0]
    (std,) = _std(shadow_phi, [~keep], pooled_variance(keep, global_variance))
    return -stats.norm.logsf(target_phi, mean, std)


def lira_online(target_phi: np.ndarray, shadow_phi: np.ndarray, keep: np.ndarray, *,
                global_variance: bool | None = None) -> np.ndarray:
    """Online LiRA: ``log N(phi; mu_in, sigma_in) - log N(phi; mu_out, sigma_out)``."""
    mu_in, mu_out = _gaussian(shadow_phi, keep)[0], _gaussian(shadow_phi, ~keep)[0]
    sd_in, sd_out = _std(shadow_phi, [keep, ~keep], pooled_variance(keep, global_variance))
    return stats.norm.logpdf(target_phi, mu_in, sd_in) - stats.norm.logpdf(
        target_phi, mu_out, sd_out)

