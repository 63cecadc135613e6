"""Linkage attacks on real k-anonymous releases, and the differencing attack on OpenDP counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from privmed.errors import ConfigError
from privmed.tabular.hierarchy import QuasiIdentifier, parse_quasi
from privmed.tabular.linkage import (
    attack_figures,
    composition_figures,
    differencing_attack,
    dp_accuracy_bound,
    link,
)
from privmed.tabular.linkage_demo import linkage_demo
from privmed.tabular.synthetic import DIAGNOSES, make_cohort


@pytest.fixture(scope="module")
def demo():
    return linkage_demo(patients=1500, population=15000, ks=(2, 5), l=2, targets=300, seed=1)


def test_dropping_names_is_not_anonymisation(demo):
    raw = demo["releases"]["names dropped"]
    assert raw["reidentified_fraction"] > 0.9  # Sweeney: birth date, postcode, sex
    assert raw["best_guess_accuracy"] > 0.9 and raw["watch_belief_mean"] > 0.9


def test_k_anonymity_stops_reidentification_but_diagnoses_still_leak(demo):
    for name in ("k=2", "k=2, l=2", "k=5", "k=5, l=2"):
        r = demo["releases"][name]
        assert r["uniquely_reidentified"] == 0 and r["min_candidates"] >= int(name[2])
        assert r["best_guess_accuracy"] > r["baseline_accuracy"] + 0.1  # still narrows
        assert r["watch_belief_mean"] > 2 * r["watch_prior"]
    # homogeneity: some classes hold one diagnosis; distinct l-diversity removes them
    assert demo["releases"]["k=2"]["value_certain"] > 0.02 * demo["patients"]
    assert demo["releases"]["k=2, l=2"]["value_certain"] == 0
    assert demo["releases"]["k=5, l=2"]["value_certain"] == 0
    assert demo["anonymization"]["k=5, l=2"]["l_achieved"] >= 2
    # composing two releases of the same patients brings certainty back
    assert demo["composition"]["k=2, l=2 with a second study"]["value_certain"] > 0


def test_differencing_is_exact_on_counts_and_near_chance_under_dp(demo):
    d = demo["differencing"]
    n = d["targets"]
    assert n >= 150 and n % 2 == 0 and d["exact_accuracy"] == 1.0
    sd = math.sqrt(0.25 / n)
    assert abs(d["dp_accuracy"] - d["dp_expected_accuracy"]) < 4 * sd
    assert d["dp_accuracy"] < min(0.5 + 5 * sd, d["dp_accuracy_bound"])  # near chance
    assert d["dp_expected_accuracy"] < 0.55 and d["release_epsilon"] <= 1.0


def test_differencing_accuracy_grows_with_epsilon_but_stays_under_the_dp_bound():
    cohort = make_cohort(800, 8000, seed=2)
    table = cohort.patients.astype(str)
    d = differencing_attack(table, ["birth_date", "postcode", "sex"], "diagnosis", "HIV",
                            DIAGNOSES, targets=60, epsilon=50.0, seed=2)
    assert d["noise_std"] < 0.25 and d["dp_expected_accuracy"] > 0.9
    assert d["dp_accuracy"] > 0.8 and d["exact_accuracy"] == 1.0  # little noise: it works
    assert d["dp_accuracy"] <= d["dp_accuracy_bound"] + 4 * math.sqrt(0.25 / d["targets"])
    with pytest.raises(ConfigError, match="pick another value"):
        differencing_attack(table, ["birth_date", "postcode", "sex"], "diagnosis", "flu",
                            DIAGNOSES)


def test_link_counts_compatible_rows_and_people_exactly():
    release = pd.DataFrame({"age": ["[30-39]", "[30-39]", "[40-49]", "[40-49]", "52"],
                            "zip": ["021**", "021**", "02***", "02***", "10001"],
                            "dx": ["flu", "flu", "flu", "HIV", "HIV"]})
    aux = pd.DataFrame({"age": [35, 45, 52, 52, 35], "zip": ["02139", "02200", "10001",
                                                             "10001", "10001"]})
    quasi = parse_quasi("age:numeric,zip:postcode")
    lk = link(release, aux, quasi, "dx")
    assert list(lk.domain) == ["HIV", "flu"]
    assert lk.candidates.tolist() == [2, 2, 1, 1, 0]
    assert lk.counts.tolist() == [[0, 2], [1, 1], [1, 0], [1, 0], [0, 0]]
    f = attack_figures(lk, np.array([0, 1, 2]), ["flu", "HIV", "HIV"], "flu", watch="HIV")
    # person 2 has one compatible row, but so does person 3: not unique
    assert f["uniquely_reidentified"] == 0
    assert f["value_certain"] == 2  # person 0: flu (homogeneity); person 2: HIV
    assert f["best_guess_accuracy"] == 1.0 and f["baseline_accuracy"] == pytest.approx(1 / 3)
    assert f["watch_belief_mean"] == pytest.approx((0.5 + 1.0) / 2)
    only = attack_figures(link(release, aux.iloc[[0, 1, 2]], quasi, "dx"),
                          np.array([2]), ["HIV"], "flu")
    assert only["uniquely_reidentified"] == 1
    with pytest.raises(ConfigError, match="compatible with no released row"):
        attack_figures(lk, np.array([4]), ["HIV"], "flu")
    other = release.assign(dx=["flu", "HIV", "HIV", "HIV", "HIV"])
    both = composition_figures(lk, link(other, aux, quasi, "dx"), np.array([0, 1]))
    # person 0: {flu} & {flu, HIV}; person 1: {flu, HIV} & {HIV}
    assert both["value_certain"] == 2 and both["mean_values_left"] == 1.0


def test_link_needs_kinds():
    with pytest.raises(ConfigError, match="needs the kind"):
        link(pd.DataFrame({"a": ["1"], "s": ["x"]}), pd.DataFrame({"a": [1]}),
             [QuasiIdentifier("a")], "s")


def test_dp_accuracy_bound():
    assert dp_accuracy_bound(0.0, 0.0) == 0.5
    assert dp_accuracy_bound(1.0, 0.0) == pytest.approx(math.e / (1 + math.e))
    assert dp_accuracy_bound(50.0, 0.0) == pytest.approx(1.0)
    assert dp_accuracy_bound(1.0, 0.1) > dp_accuracy_bound(1.0, 0.0)
