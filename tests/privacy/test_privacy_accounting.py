"""Epsilon accounting and noise calibration against Opacus's own accountants."""

from __future__ import annotations

import math
import time
import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privmed.errors import ConfigError
from privmed.privacy import (
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_curve,
    history_from_json,
    history_to_json,
    make_accountant,
)
from privmed.privacy.accounting import history_covers, history_union, merge_history

DELTA = 1e-5
H1 = [(1.0, 0.05, 300)]
H2 = [(2.0, 0.1, 200)]


def opacus_epsilon(history, accountant):
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("history", [H1, H2, H1 + H2, [(1.2, 0.02, 1)], [(3.0, 1.0, 20)]])
def test_rdp_matches_opacus(history):
    assert compute_epsilon(history, DELTA, "rdp") == pytest.approx(
        opacus_epsilon(history, "rdp"), rel=1e-9)


@pytest.mark.parametrize("history", [H1, H1 + H2, [(1.2, 0.02, 1)], [(3.0, 1.0, 20)]])
def test_prv_matches_opacus(history):
    # Opacus adds a fixed 0.01 error margin; ours is 0.2% of epsilon, so allow both.
    ours, theirs = compute_epsilon(history, DELTA, "prv"), opacus_epsilon(history, "prv")
    assert abs(ours - theirs) <= 0.012 + 0.005 * theirs
    assert ours < compute_epsilon(history, DELTA, "rdp")  # PRV is the tighter bound


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_heterogeneous_composition(accountant):
    e1 = compute_epsilon(H1, DELTA, accountant)
    e2 = compute_epsilon(H2, DELTA, accountant)
    both = compute_epsilon(H1 + H2, DELTA, accountant)
    assert max(e1, e2) < both < e1 + e2
    # Order does not matter, splitting an entry does not matter.
    assert compute_epsilon(H2 + H1, DELTA, accountant) == pytest.approx(both, rel=1e-9)
    split = [(1.0, 0.05, 100), (2.0, 0.1, 200), (1.0, 0.05, 200)]
    assert compute_epsilon(split, DELTA, accountant) == pytest.approx(both, rel=1e-9)


def test_empty_and_degenerate_histories():
    assert compute_epsilon([], DELTA) == 0.0
    assert compute_epsilon([(1.0, 0.05, 0)], DELTA, "rdp") == 0.0
    assert compute_epsilon([(0.0, 0.05, 10)], DELTA) == math.inf  # no noise, no privacy
    for bad in ([(1.0, 0.0, 10)], [(1.0, 1.5, 10)], [(-1.0, 0.1, 10)], [(1.0, 0.1, -3)],
                [(1.0, 0.1)], [("a", 0.1, 3)], [(1.0, 0.1, 2.5)]):
        with pytest.raises(ConfigError):
            compute_epsilon(bad, DELTA)
    with pytest.raises(ConfigError):
        compute_epsilon(H1, 0.0)
    with pytest.raises(ConfigError):
        compute_epsilon(H1, DELTA, "gdp")


def test_prv_edge_sizes_are_fast_and_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # q = 1 used to emit log(0) warnings
        start = time.perf_counter()
        tiny = compute_epsilon([(1.0, 0.05, 1)], DELTA)
        full_batch = compute_epsilon([(5.0, 1.0, 10)], DELTA)
        long = compute_epsilon([(1.0, 0.01, 10_000)], DELTA)
        huge = compute_epsilon([(0.3, 0.5, 500)], DELTA)  # beyond PRV's range: RDP bound
        elapsed = time.perf_counter() - start
    assert 0 < tiny < compute_epsilon([(1.0, 0.05, 2)], DELTA)
    assert 0 < full_batch < compute_epsilon([(5.0, 1.0, 10)], DELTA, "rdp")
    assert math.isfinite(long) and long > 1
    assert huge == pytest.approx(compute_epsilon([(0.3, 0.5, 500)], DELTA, "rdp"))
    assert elapsed < 10


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_hits_target(accountant):
    sigmas = []
    for target in (0.5, 1.0, 3.0, 8.0):
        sigma = calibrate_noise_multiplier(target, DELTA, 0.05, 1000, accountant)
        eps = compute_epsilon([(sigma, 0.05, 1000)], DELTA, accountant)
        assert 0.99 * target <= eps <= target
        # The smallest such sigma: a little less noise overshoots the target.
        assert compute_epsilon([(0.97 * sigma, 0.05, 1000)], DELTA, accountant) > target
        sigmas.append(sigma)
    assert sigmas == sorted(sigmas, reverse=True)  # looser target, less noise


def test_calibration_is_quick_for_typical_values():
    start = time.perf_counter()
    calibrate_noise_multiplier(2.0, 1e-5, 0.05, 1200, "prv")
    assert time.perf_counter() - start < 5  # ~0.3 s alone; slack for a busy machine


@pytest.mark.parametrize("target", [1e-5, 0.0, -1.0, math.inf, math.nan])
def test_impossible_targets(target):
    with pytest.raises(ConfigError) as info:
        calibrate_noise_multiplier(target, DELTA, 0.05, 1000, "rdp")
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


def test_calibration_rejects_bad_settings():
    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(1.0, DELTA, 0.05, 0)
    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(1.0, DELTA, 0.0, 100)
    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(1.0, 1.5, 0.05, 100)


def test_epsilon_curve():
    history = [(1.0, 0.05, 300), (2.0, 0.05, 300)]
    curve = epsilon_curve(history, DELTA, "prv", points=12)
    steps = [s for s, _ in curve]
    eps = [e for _, e in curve]
    assert curve[0] == (0, 0.0) and steps[-1] == 600
    assert 300 in steps  # entry boundaries are included when there are few entries
    assert len(curve) <= 13
    assert all(a <= b for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] == compute_epsilon(history, DELTA)
    rdp = epsilon_curve(history, DELTA, "rdp", points=5)
    assert rdp[-1][1] == pytest.approx(compute_epsilon(history, DELTA, "rdp"))
    assert epsilon_curve([], DELTA) == [(0, 0.0)]


def test_history_json_round_trip_and_helpers():
    history = [(1.1, 0.05, 10), (0.9, 0.02, 3)]
    data = history_to_json(history)
    assert data[0] == {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 10}
    assert history_from_json(data) == history
    with pytest.raises(ConfigError):
        history_from_json([{"noise_multiplier": 1.0}])
    assert merge_history([(1.0, 0.1, 2), (1.0, 0.1, 3), (2.0, 0.1, 0)]) == [(1.0, 0.1, 5)]
    assert history_union([(1.0, 0.1, 5)], [(1.0, 0.1, 3), (2.0, 0.1, 1)]) == [
        (1.0, 0.1, 5), (2.0, 0.1, 1)]
    assert history_covers([(1.0, 0.1, 5)], [(1.0, 0.1, 4)])
    assert not history_covers([(1.0, 0.1, 5)], [(1.0, 0.2, 1)])


def test_make_accountant():
    acc = make_accountant("rdp", H1)
    assert isinstance(acc, RDPAccountant) and acc.history == H1
    assert isinstance(make_accountant("prv"), PRVAccountant)
    with pytest.raises(ConfigError):
        make_accountant("moments")
