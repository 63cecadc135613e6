"""Attack metrics and epsilon lower bounds, checked against mechanisms of known epsilon."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats

from privmed.audit.epsilon import (
    clopper_pearson,
    empirical_epsilon,
    one_run_epsilon,
    roc_metrics,
)
from privmed.errors import ConfigError


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _gdp_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of mu-GDP at delta (Dong, Roth & Su 2019, Corollary 2.13)."""

    def gap(eps: float) -> float:
        return (stats.norm.cdf(-eps / mu + mu / 2)
                - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)

    return optimize.brentq(gap, 0.0, 50.0)


def _randomised_response(eps: float, n: int, rng: np.random.Generator):
    """Members answer 1 w.p. e^eps / (1 + e^eps), non-members w.p. 1 / (1 + e^eps):
    exactly eps-DP, and the best test has TPR / FPR = e^eps."""
    p = math.exp(eps) / (1 + math.exp(eps))
    members = (rng.random(n) < p).astype(float)
    nonmembers = (rng.random(n) < 1 - p).astype(float)
    return members, nonmembers


# ----------------------------------------------------------------------------- Clopper-Pearson

def test_clopper_pearson_matches_tabulated_and_closed_form_values():
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-5)  # standard tables / R's binom.test
    assert hi == pytest.approx(0.81291, abs=1e-5)
    # k = 0 and k = n have closed forms: 1 - (alpha/2)^(1/n) and (alpha/2)^(1/n).
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    assert clopper_pearson(0, 20, confidence=0.99) == pytest.approx((0.0, 1 - 0.005 ** 0.05))
    # Coverage: the binomial tail at each end is exactly alpha / 2.
    lo, hi = clopper_pearson(37, 200, confidence=0.9)
    assert stats.binom.sf(36, 200, lo) == pytest.approx(0.05, rel=1e-6)
    assert stats.binom.cdf(37, 200, hi) == pytest.approx(0.05, rel=1e-6)
    # A wider confidence level gives a wider interval.
    lo99, hi99 = clopper_pearson(37, 200, confidence=0.99)
    assert lo99 < lo and hi99 > hi


@pytest.mark.parametrize("k, n, conf", [(-1, 10, 0.95), (11, 10, 0.95), (0, 0, 0.95),
                                        (3, 10, 1.0), (3, 10, 0.2)])
def test_clopper_pearson_rejects_bad_input(k, n, conf):
    with pytest.raises(ConfigError):
        clopper_pearson(k, n, conf)


# ----------------------------------------------------------------------------- ROC metrics

def test_roc_metrics_on_separable_identical_and_gaussian_scores():
    perfect = roc_metrics([5.0, 6.0, 7.0], [1.0, 2.0])
    assert perfect["auc"] == 1.0 and perfect["tpr_at_fpr_0.001"] == 1.0
    ties = roc_metrics([1.0] * 50, [1.0] * 50)
    assert ties["auc"] == 0.5 and ties["tpr_at_fpr_0.01"] == 0.0

    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1.0, 1.0, 20000), rng.normal(0.0, 1.0, 20000)
    m = roc_metrics(members, nonmembers)
    assert m["auc"] == pytest.approx(stats.norm.cdf(1 / math.sqrt(2)), abs=0.01)
    # Unit-variance Gaussians: TPR at FPR f is Phi(mu - Phi^-1(1 - f)).
    assert m["tpr_at_fpr_0.01"] == pytest.approx(stats.norm.cdf(1 - stats.norm.isf(0.01)),
                                                 abs=0.015)
    assert m["tpr_at_fpr_0.001"] == pytest.approx(stats.norm.cdf(1 - stats.norm.isf(0.001)),
                                                  abs=0.01)
    fpr, tpr = np.array(m["fpr"]), np.array(m["tpr"])
    assert 10 < len(fpr) <= 200 and len(fpr) == len(tpr)
    assert fpr[0] == pytest.approx(1 / 20000) and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert (np.diff(fpr) > 0).all() and (np.diff(tpr) >= 0).all()
    # Log-spaced: the points spread over the decades, not bunched at high FPR.
    assert (fpr < 1e-3).sum() >= 15 and (fpr < 1e-2).sum() >= 50
    json.dumps(m, allow_nan=False)


def test_roc_metrics_rejects_empty_or_nan_scores():
    with pytest.raises(ConfigError):
        roc_metrics([], [1.0])
    with pytest.raises(ConfigError):
        roc_metrics([1.0, float("nan")], [1.0])


# ----------------------------------------------------------------------------- empirical epsilon

@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_empirical_epsilon_on_randomised_response_is_valid_and_tight(eps):
    for seed in range(5):
        members, nonmembers = _randomised_response(eps, 20000, np.random.default_rng(seed))
        out = empirical_epsilon(members, nonmembers, delta=0.0, seed=seed)
        assert 0.0 < out["eps_lb"] <= eps
        assert out["eps_lb"] > 0.8 * eps  # 10^4 trials per half: close to the truth
        # The guarantee itself, at the chosen threshold, within the confidence intervals.
        tpr_lo, fpr_hi = out["intervals"]["tpr"][0], out["intervals"]["fpr"][1]
        assert tpr_lo <= math.exp(eps) * fpr_hi
        assert 1 - fpr_hi <= math.exp(eps) * (1 - tpr_lo)


def test_empirical_epsilon_on_gaussian_scores_stays_below_the_gdp_epsilon():
    delta = 1e-5
    for mu in (1.0, 3.0):
        true_eps = _gdp_epsilon(mu, delta)
        rng = np.random.default_rng(int(mu))
        members, nonmembers = rng.normal(mu, 1, 5000), rng.normal(0, 1, 5000)
        out = empirical_epsilon(members, nonmembers, delta)
        assert 0.3 < out["eps_lb"] <= true_eps
        counts = out["counts"]
        assert counts["members_select"] + counts["members_eval"] == 5000
        assert out["tpr"] == counts["true_positives"] / counts["members_eval"]
        json.dumps(out, allow_nan=False)


def test_empirical_epsilon_without_signal_is_zero():
    """Members and non-members from one distribution: a 95 % bound should be 0 in at
    least 95 % of the trials (here: all but at most 2 of 20)."""
    positive = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        out = empirical_epsilon(rng.normal(size=300), rng.normal(size=300), 1e-5, seed=seed)
        positive += out["eps_lb"] > 0
    assert positive <= 2


def test_empirical_epsilon_chooses_the_threshold_on_the_other_half():
    """Tiny selection half: the threshold found there only earns what the evaluation
    half confirms (an overfit threshold with one member above it proves little)."""
    rng = np.random.default_rng(4)
    out = empirical_epsilon(rng.normal(0.5, 1, 40), rng.normal(0, 1, 40), 1e-5)
    assert out["counts"]["members_eval"] == 20
    assert out["eps_lb"] <= _gdp_epsilon(0.5, 1e-5)


def test_empirical_epsilon_rejects_bad_input():
    with pytest.raises(ConfigError):
        empirical_epsilon([1.0], [0.0, 1.0], 1e-5)
    with pytest.raises(ConfigError):
        empirical_epsilon([1.0, 2.0], [0.0, 1.0], 1.5)


# ----------------------------------------------------------------------------- one-run bound

def test_one_run_epsilon_closed_form_and_monotone():
    # All r guesses right: P[Bin(r, q) >= r] = q^r = 0.05, so eps = logit(0.05^(1/r)).
    for r in (10, 50, 200):
        assert one_run_epsilon(r, r) == pytest.approx(_logit(0.05 ** (1 / r)), abs=1e-6)
    bounds = [one_run_epsilon(c, 100) for c in range(40, 101, 5)]
    assert bounds[0] == 0.0 and bounds[2] == 0.0  # at or below chance: nothing shown
    assert all(b2 > b1 for b1, b2 in zip(bounds[3:], bounds[4:], strict=False))
    assert one_run_epsilon(90, 100, confidence=0.99) < one_run_epsilon(90, 100)
    # The delta term of the (eps, delta) version only weakens the bound.
    with_delta = one_run_epsilon(90, 100, delta=1e-3, canaries=1000)
    assert 0 < with_delta < one_run_epsilon(90, 100)
    assert one_run_epsilon(0, 0) == 0.0


def test_one_run_epsilon_never_exceeds_the_true_epsilon():
    """Guesses right w.p. e^eps / (1 + e^eps), the worst case eps-DP allows: a 95 %
    bound may exceed eps in at most 5 % of audits (here 200; 16 allows for chance)."""
    eps = 1.5
    p = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(0)
    bounds = np.array([one_run_epsilon(int((rng.random(400) < p).sum()), 400)
                       for _ in range(200)])
    assert (bounds > eps).sum() <= 16
    assert bounds.max() < eps + 0.5
    assert np.median(bounds) > 0.8  # and it does find a good part of it


@pytest.mark.parametrize("correct, guesses", [(5, 4), (-1, 4), (2, -1)])
def test_one_run_epsilon_rejects_bad_counts(correct, guesses):
    with pytest.raises(ConfigError):
        one_run_epsilon(correct, guesses)
