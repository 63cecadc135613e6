"""95 % confidence intervals for the figures a clinician reads.

* Proportions (sensitivity, specificity, accuracy, precision): Wilson score interval,
  from SciPy's ``binomtest(...).proportion_ci(method="wilson")``.
* ROC-AUC: DeLong et al. (1988), in Sun & Xu's (2014) mid-rank form. Hand-written
  because neither SciPy nor scikit-learn offers it.

An interval that cannot be computed honestly is ``None`` (shown as a dash), never a
zero-width interval that would look certain.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest, norm, rankdata

LEVEL = 0.95


def wilson_ci(successes: int, trials: int, level: float = LEVEL) -> list[float] | None:
    """Wilson score interval ``[low, high]`` of ``successes / trials``; None when trials = 0."""
    if trials <= 0:
        return None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level,
                                                            method="wilson")
    return [float(ci.low), float(ci.high)]


def delong_auc_variance(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC) for binary ``labels`` (1 = positive) and scores.

    Ties count one half, as in the Mann-Whitney statistic. Needs at least two images of
    each class (the variance uses the sample variance of the structural components).
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels], scores[~labels]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        raise ValueError("DeLong's variance needs at least two images of each class.")
    rank_all = rankdata(np.concatenate([pos, neg]))  # mid-ranks: ties share their rank
    rank_pos, rank_neg = rankdata(pos), rankdata(neg)
    # Structural components: per positive, the share of negatives it outscores; per
    # negative, the share of positives that outscore it.
    v10 = (rank_all[:m] - rank_pos) / n
    v01 = 1.0 - (rank_all[m:] - rank_neg) / m
    auc = float(v10.mean())
    var = float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    return auc, var


def auc_ci(labels: np.ndarray, scores: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """DeLong ``[low, high]`` for the ROC-AUC, clipped to [0, 1]; None where it is
    undefined (fewer than two images of a class) or degenerate (zero variance, e.g. perfect
    separation on few images: a zero-width interval would claim certainty it lacks)."""
    try:
        auc, var = delong_auc_variance(labels, scores)
    except ValueError:
        return None
    if not var > 0 or not math.isfinite(var):
        return None
    half = float(norm.ppf(0.5 + level / 2)) * math.sqrt(var)
    return [max(0.0, auc - half), min(1.0, auc + half)]
