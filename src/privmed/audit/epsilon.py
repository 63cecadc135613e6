"""Attack metrics and empirical epsilon lower bounds from membership scores.

Every function takes scores where *higher means "member"* and returns plain
Python numbers (strict JSON: no NaN, no infinity).

* :func:`roc_metrics`: ROC-AUC, TPR at 0.1 % and 1 % FPR and a log-spaced ROC
  curve, the figures membership-inference papers report (Carlini et al. 2022).
* :func:`empirical_epsilon`: a lower bound on epsilon that holds with the given
  confidence. (epsilon, delta)-DP implies, for every membership test,
  ``TPR <= e^eps * FPR + delta`` and ``TNR <= e^eps * FNR + delta``; with
  Clopper-Pearson bounds ``TPR >= TPR_lo`` and ``FPR <= FPR_hi`` this gives
  ``eps >= ln((TPR_lo - delta) / FPR_hi)`` and
  ``eps >= ln((1 - FPR_hi - delta) / (1 - TPR_lo))``. The threshold is chosen on
  one random half of the scores and the bound computed on the other, as in
  jax_privacy's auditing (``Split`` strategy) and ML Privacy Meter.
* :func:`one_run_epsilon`: the bound of Steinke, Nasr & Jagielski 2023 from the
  guesses of a one-training-run canary audit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from privmed.errors import ConfigError

ArrayLike = Sequence[float] | np.ndarray
ROC_POINTS = 200


def _check_confidence(confidence: float) -> float:
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"The confidence level must lie in [0.5, 1), got {confidence}.")
    return float(confidence)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for ``k`` successes in ``n`` trials.

    Each end is a one-sided bound at level ``1 - (1 - confidence) / 2``, so a lower
    bound on one rate and an upper bound on another hold together with probability
    at least ``confidence`` (union bound).
    """
    confidence = _check_confidence(confidence)
    if n < 1 or not 0 <= k <= n:
        raise ConfigError(f"Clopper-Pearson needs 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def _scores(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> tuple[np.ndarray, ...]:
    m = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    o = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if m.size == 0 or o.size == 0:
        raise ConfigError("Membership metrics need at least one member and one non-member score.")
    if not (np.isfinite(m).all() and np.isfinite(o).all()):
        raise ConfigError("Membership scores must be finite numbers.")
    return m, o


def _counts(members: np.ndarray, nonmembers: np.ndarray,
            thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Members and non-members scoring >= each threshold (guessed "member")."""
    tp = members.size - np.searchsorted(np.sort(members), thresholds, side="left")
    fp = nonmembers.size - np.searchsorted(np.sort(nonmembers), thresholds, side="left")
    return tp, fp


def _roc(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP counts of every threshold, from "nobody is a member" to "everybody"."""
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([members, nonmembers]))[::-1]])
    return _counts(members, nonmembers, thresholds)


def roc_metrics(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> dict:
    """ROC-AUC, TPR at 0.1 % and 1 % FPR, and a ROC curve for a log-log plot.

    ``tpr_at_fpr_X`` is the best TPR among thresholds whose FPR is at most X (so
    with fewer than 1 / X non-members it is the TPR at zero false positives).
    ``fpr`` / ``tpr`` list at most 200 points of the ROC step curve at log-spaced
    FPR values from 1 / n_nonmembers to 1 (no zero FPR, so both axes can be
    logarithmic).
    """
    m, o = _scores(member_scores, nonmember_scores)
    tp, fp = _roc(m, o)
    tpr, fpr = tp / m.size, fp / o.size
    # Mann-Whitney U: P[member score > non-member score] + 0.5 P[tie].
    ranks = stats.rankdata(np.concatenate([m, o]))
    auc = (ranks[: m.size].sum() - m.size * (m.size + 1) / 2) / (m.size * o.size)

    def tpr_at(limit: float) -> float:
        return float(tpr[fpr <= limit + 1e-12].max())

    ks = np.unique(np.round(np.geomspace(1, o.size, min(ROC_POINTS, o.size))).astype(int))
    # For k false positives allowed: the best TPR of any threshold with FP <= k.
    best = np.maximum.accumulate(tpr)  # fp is non-decreasing along the thresholds
    idx = np.searchsorted(fp, ks, side="right") - 1
    return {
        "auc": float(auc),
        "tpr_at_fpr_0.001": tpr_at(0.001),
        "tpr_at_fpr_0.01": tpr_at(0.01),
        "fpr": [float(k / o.size) for k in ks],
        "tpr": [float(best[i]) for i in idx],
        "members": int(m.size),
        "nonmembers": int(o.size),
    }


def _bounds(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int, delta: float,
            confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per threshold: eps bound of each direction, TPR lower and FPR upper CP bound."""
    alpha = 1.0 - confidence
    tp, fp = np.asarray(tp), np.asarray(fp)
    tpr_lo = np.where(tp > 0, stats.beta.ppf(alpha / 2, np.maximum(tp, 1), n_pos - tp + 1), 0.0)
    fpr_hi = np.where(fp < n_neg, stats.beta.ppf(1 - alpha / 2, fp + 1,
                                                 np.maximum(n_neg - fp, 1)), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.where(tpr_lo > delta, np.log(tpr_lo - delta) - np.log(fpr_hi), 0.0)
        tnr_lo, fnr_hi = 1.0 - fpr_hi, 1.0 - tpr_lo
        backward = np.where(tnr_lo > delta, np.log(tnr_lo - delta) - np.log(fnr_hi), 0.0)
    forward = np.nan_to_num(np.maximum(forward, 0.0), posinf=0.0)
    backward = np.nan_to_num(np.maximum(backward, 0.0), posinf=0.0)
    return forward, backward, tpr_lo, fpr_hi


def empirical_epsilon(member_scores: ArrayLike, nonmember_scores: ArrayLike, delta: float, *,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """Lower bound on the epsilon of the training that produced these scores.

    Members and non-members are each split into two random halves. On the first
    ("select") half the threshold whose Clopper-Pearson bound is largest is chosen
    (the raw point estimate ln(TPR / FPR) is infinite at zero false positives, so
    the bound is what is maximised, as jax_privacy does); on the second
    ("evaluate") half, at that threshold,

    ``eps_lb = max(ln((TPR_lo - delta) / FPR_hi), ln((1 - FPR_hi - delta) / (1 - TPR_lo)))``

    (0 when neither is positive), where ``[TPR_lo, TPR_hi]`` and ``[FPR_lo, FPR_hi]``
    are Clopper-Pearson intervals at ``confidence``. Both directions use only
    ``TPR_lo`` and ``FPR_hi``, each a one-sided bound at ``1 - (1 - confidence) / 2``,
    so ``eps_lb`` holds with probability at least ``confidence`` (treating examples
    as independent trials, as the field does).
    """
    confidence = _check_confidence(confidence)
    if not 0 <= delta < 1:
        raise ConfigError(f"Delta must lie in [0, 1), got {delta}.")
    m, o = _scores(member_scores, nonmember_scores)
    if m.size < 2 or o.size < 2:
        raise ConfigError("An epsilon lower bound needs at least two members and two "
                          "non-members (one of each per half).")
    rng = np.random.default_rng(seed)
    m, o = rng.permutation(m), rng.permutation(o)
    m_sel, m_eval = m[: m.size // 2], m[m.size // 2:]
    o_sel, o_eval = o[: o.size // 2], o[o.size // 2:]

    candidates = np.concatenate([[np.inf], np.unique(np.concatenate([m_sel, o_sel]))])
    tp, fp = _counts(m_sel, o_sel, candidates)
    fwd, bwd, _, _ = _bounds(tp, fp, m_sel.size, o_sel.size, delta, confidence)
    score = np.maximum(fwd, bwd)
    if score.max() > 0:
        best = int(np.argmax(score))
    else:  # no positive bound anywhere: fall back to the best balanced accuracy
        best = int(np.argmax(tp / m_sel.size - fp / o_sel.size))
    threshold = float(candidates[best])
    select_eps = float(score[best])

    tp_e, fp_e = _counts(m_eval, o_eval, np.array([threshold]))
    fwd_e, bwd_e, _, _ = _bounds(tp_e, fp_e, m_eval.size, o_eval.size, delta, confidence)
    tp_n, fp_n = int(tp_e[0]), int(fp_e[0])
    tpr_ci = clopper_pearson(tp_n, m_eval.size, confidence)
    fpr_ci = clopper_pearson(fp_n, o_eval.size, confidence)
    direction = "tpr/fpr" if fwd_e[0] >= bwd_e[0] else "tnr/fnr"
    return {
        "eps_lb": float(max(fwd_e[0], bwd_e[0])),
        "direction": direction,
        "threshold": threshold if math.isfinite(threshold) else None,
        "tpr": tp_n / m_eval.size,
        "fpr": fp_n / o_eval.size,
        "intervals": {"tpr": list(tpr_ci), "fpr": list(fpr_ci)},
        "confidence": confidence,
        "delta": float(delta),
        "select_eps_lb": select_eps,
        "counts": {"members_select": int(m_sel.size), "nonmembers_select": int(o_sel.size),
                   "members_eval": int(m_eval.size), "nonmembers_eval": int(o_eval.size),
                   "true_positives": tp_n, "false_positives": fp_n},
    }


def _one_run_p_value(correct: int, guesses: int, eps: float, delta: float,
                     canaries: int) -> float:
    """P[>= correct right guesses] under (eps, delta)-DP (Steinke et al. 2023, Thm 3.1 /
    Prop. 5.7; the delta term as jax_privacy computes it)."""
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(correct - 1, guesses, q))
    if delta == 0:
        return beta
    i = np.arange(1, correct + 1)
    alpha = float(np.max((stats.binom.sf(correct - i - 1, guesses, q) - beta) / i, initial=0))
    return min(beta + alpha * delta * 2 * canaries, 1.0)


def one_run_epsilon(correct: int, guesses: int, *, confidence: float = 0.95,
                    delta: float = 0.0, canaries: int | None = None) -> float:
    """Epsilon lower bound from a one-run audit (Steinke, Nasr & Jagielski 2023).

    ``guesses`` membership guesses were made on canaries each included in training
    with probability 1/2, ``correct`` of them right. Under eps-DP the number right
    is stochastically dominated by ``Binomial(guesses, e^eps / (1 + e^eps))``; the
    result is the largest eps with ``P[Binomial >= correct] <= 1 - confidence``
    (found by bisection), i.e. every smaller eps is rejected at that confidence;
    0 when even eps = 0 is not rejected. ``delta > 0`` (with the number of
    ``canaries``, m) adds the paper's delta term, making the bound slightly smaller.
    """
    confidence = _check_confidence(confidence)
    if guesses < 0 or not 0 <= correct <= guesses:
        raise ConfigError(f"A one-run audit needs 0 <= correct <= guesses, got {correct} "
                          f"correct of {guesses}.")
    if not 0 <= delta < 1:
        raise ConfigError(f"Delta must lie in [0, 1), got {delta}.")
    m = canaries if canaries is not None else guesses
    if delta > 0 and m < guesses:
        raise ConfigError(f"There cannot be more guesses ({guesses}) than canaries ({m}).")
    alpha = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return _one_run_p_value(correct, guesses, eps, delta, m) <= alpha

    if correct == 0 or not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, hi * 2
        if hi > 1e3:  # cannot happen for correct >= 1, but never loop forever
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
        if hi - lo < 1e-9:
            break
    return float(lo)
