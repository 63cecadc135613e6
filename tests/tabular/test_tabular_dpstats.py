"""DP statistics with real OpenDP measurements, charged to a real SQLite ledger."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from privmed.errors import BudgetExceededError, ConfigError, DataError
from privmed.privacy import BudgetLedger, compute_epsilon
from privmed.tabular import dpstats
from privmed.tabular.dpstats import (
    HistogramQuery,
    MeanQuery,
    dp_stats,
    histogram_queries,
    parse_categories,
    parse_mean,
    plan_stats,
    rows_per_patient,
    run_plan,
)
from privmed.tabular.table import table_id

DX = ("a", "b", "c")


def table(n: int = 500, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"pid": [f"p{i}" for i in range(n)],
                         "age": rng.integers(20, 80, n).astype(str),
                         "dx": rng.choice(list("abcz"), n, p=[0.5, 0.3, 0.15, 0.05])})


def test_plan_meets_epsilon_and_opendp_agrees_with_the_accountant():
    plan = plan_stats(count=True, histograms=[HistogramQuery("dx", DX)],
                      means=[MeanQuery("age", 0, 100)], epsilon=1.0, delta=1e-6)
    z = plan.noise_multiplier
    assert plan.history == [(z, 1.0, 3)]
    assert 0.98 <= plan.achieved_epsilon <= 1.0
    assert plan.achieved_epsilon == compute_epsilon([(z, 1.0, 3)], 1e-6, "prv")
    for m in plan.mechanisms:
        assert m.rho == pytest.approx(1 / (2 * z * z), rel=1e-12)  # OpenDP's own privacy map
        assert m.scale == pytest.approx(z * m.sensitivity, rel=1e-12)
    sens = {m.kind: m.sensitivity for m in plan.mechanisms}
    assert sens["count"] == 1 and sens["histogram"] == 1
    assert sens["sum"] == pytest.approx(50.0, rel=1e-9)  # half the bounds' width
    # OpenDP's own zCDP -> (eps, delta) conversion is valid but looser than PRV
    assert plan.achieved_epsilon < plan.opendp_epsilon() < 1.2
    # more queries at the same epsilon: more noise each
    assert plan_stats(count=True, epsilon=1.0).noise_multiplier < z


def test_count_noise_has_the_calibrated_standard_deviation():
    plan = plan_stats(count=True, epsilon=2.0, delta=1e-5)
    sigma = plan.mechanisms[0].scale
    measurement = plan.mechanisms[0].measurement
    draws = np.array([measurement([1] * 300) for _ in range(3000)], dtype=float)
    # std of a sample std over 3000 draws is ~1.3%: 8% is six of them
    assert np.std(draws) == pytest.approx(sigma, rel=0.08)
    assert np.mean(draws) == pytest.approx(300, abs=5 * sigma / math.sqrt(3000))
    assert len(np.unique(draws)) > 10  # really noisy, not a constant


def test_means_are_accurate_and_clamped_to_the_public_bounds():
    n = 20000
    big = pd.DataFrame({"x": np.full(n, "1000"), "y": np.full(n, "-7"),
                        "z": np.linspace(10, 30, n).astype(str)})
    plan = plan_stats(means=[MeanQuery("x", 0, 10), MeanQuery("y", 0, 10),
                             MeanQuery("z", 0, 100)], epsilon=5.0)
    out = {s.get("column"): s for s in run_plan(plan, big)}
    assert out["x"]["value"] == pytest.approx(10, abs=0.05) and out["x"]["value"] <= 10
    assert out["y"]["value"] == pytest.approx(0, abs=0.05) and out["y"]["value"] >= 0
    assert out["z"]["value"] == pytest.approx(20, abs=0.2)
    assert out[None]["statistic"] == "count"  # the means' shared count is released too
    # all values outside the bounds on a tiny table: still inside the bounds
    tiny = pd.DataFrame({"x": ["1e9", "2e9"]})
    for _ in range(20):
        (count, mean) = run_plan(plan_stats(means=[MeanQuery("x", -1, 1)], epsilon=0.1), tiny)
        assert -1 <= mean["value"] <= 1


def test_histogram_uses_declared_categories_and_counts_the_rest_as_other():
    df = table(4000)
    out = dp_stats(df, histograms=[HistogramQuery("dx", DX)], epsilon=50.0)
    (h,) = out["statistics"]
    true = df["dx"].value_counts()
    for cat in DX:
        assert h["counts"][cat] == pytest.approx(true[cat], abs=6 * h["noise_std"])
    assert h["other"] == pytest.approx(true["z"], abs=6 * h["noise_std"])
    assert set(h["counts"]) == set(DX)  # "z" is not named: not revealed as a category
    assert out["ledger"] is None


def test_ledger_is_charged_exactly_the_accountants_epsilon(tmp_path):
    df = table()
    book = BudgetLedger(tmp_path / "ledger.sqlite")
    ds = table_id(df)
    book.set_budget(ds, 3.0, 1e-6, "rdp")
    out = dp_stats(df, count=True, means=[MeanQuery("age", 0, 100)], epsilon=1.0,
                   delta=1e-6, ledger=book)
    assert out["accountant"] == "rdp"  # the budget's accountant, as training uses it
    z = out["noise_multiplier"]
    (entry,) = book.entries(ds)
    assert entry["status"] == "committed" and entry["run_id"].startswith("dp-stats-")
    assert entry["history"] == [{"noise_multiplier": z, "sample_rate": 1.0, "steps": 2}]
    assert entry["epsilon"] == compute_epsilon([(z, 1.0, 2)], 1e-6, "rdp")
    assert out["ledger"]["charged_epsilon"] == entry["epsilon"] <= 1.0
    assert book.spent(ds) == pytest.approx(entry["epsilon"])
    # a second release composes with the first (not added): RDP composition
    dp_stats(df, count=True, epsilon=1.0, delta=1e-6, ledger=book)
    both = compute_epsilon([(z, 1.0, 2), *[(h["noise_multiplier"], 1.0, 1) for h in
                                          book.entries(ds)[1]["history"]]], 1e-6, "rdp")
    assert book.spent(ds) == pytest.approx(both) and both < 2 * entry["epsilon"]


def test_a_release_beyond_the_budget_is_refused_before_any_noise_is_drawn(tmp_path,
                                                                          monkeypatch):
    df = table()
    book = BudgetLedger(tmp_path / "ledger.sqlite")
    book.set_budget("00000000000000aa", 1.2, 1e-6)  # two eps-1 Gaussians compose to 1.45
    dp_stats(df, count=True, epsilon=1.0, ledger=book, dataset_id="00000000000000aa")
    calls = []
    real_plan = dpstats.plan_stats

    def spying_plan(**kwargs):
        plan = real_plan(**kwargs)
        for m in plan.mechanisms:
            inner = m.measurement
            m.measurement = lambda x, inner=inner: calls.append(1) or inner(x)
        return plan

    monkeypatch.setattr(dpstats, "plan_stats", spying_plan)
    with pytest.raises(BudgetExceededError, match=r"Refused: with this run.* alone: 1.00\)"):
        dp_stats(df, count=True, epsilon=1.0, ledger=book, dataset_id="00000000000000aa")
    assert calls == [] and len(book.entries()) == 1
    dp_stats(df, count=True, epsilon=0.3, ledger=book, dataset_id="00000000000000aa")
    assert calls == [1] and len(book.entries()) == 2  # a smaller one still fits


def test_one_row_per_patient_bounds_each_patients_contribution():
    df = table(300)
    tripled = pd.concat([df, df, df], ignore_index=True)
    counts = [dp_stats(tripled, count=True, epsilon=20.0, patient_column="pid")
              ["statistics"][0]["value"] for _ in range(5)]
    assert abs(np.mean(counts) - 300) < 10
    out = dp_stats(tripled, count=True, epsilon=20.0, patient_column="pid")
    assert "one patient" in out["unit_of_privacy"] and out["unit"] == "patient"
    assert out["max_rows_per_patient"] == 1 and out["note"] is None
    with pytest.raises(DataError, match="no column 'nope' named by --patient-column"):
        dp_stats(df, count=True, patient_column="nope")


def test_rows_per_patient_keeps_the_first_k_rows_of_each_patient_in_table_order():
    df = pd.DataFrame({"pid": ["a", "b", "a", "a", "c", "a", "b", "a"],
                       "x": [str(v) for v in range(8)]})  # patient a: 5 rows
    kept = rows_per_patient(df, "pid", 2)
    assert kept["pid"].value_counts().max() <= 2
    assert kept["pid"].value_counts().to_dict() == {"a": 2, "b": 2, "c": 1}
    assert kept["x"].tolist() == ["0", "1", "2", "4", "6"]  # table order, not by value
    assert rows_per_patient(df, "pid", 1)["x"].tolist() == ["0", "1", "4"]
    assert len(rows_per_patient(df, "pid", 9)) == 8


def test_k_rows_per_patient_scales_every_sensitivity_and_noise_by_k():
    """OpenDP's stability maps at unit_of(contributions=k): count Δ = k, histogram L2
    Δ = k (not sqrt(k): a patient's rows may share a category), sum Δ = k·h; the noise
    multiplier (hence ε) is unchanged, so every noise scale doubles from k = 1 to 2."""
    kwargs = {"count": True, "histograms": [HistogramQuery("dx", DX)],
              "means": [MeanQuery("age", 0, 100)], "epsilon": 1.0, "delta": 1e-6}
    one, two = plan_stats(**kwargs), plan_stats(**kwargs, max_rows_per_patient=2)
    assert (one.contributions, two.contributions) == (1, 2)
    assert two.noise_multiplier == one.noise_multiplier
    assert two.achieved_epsilon == pytest.approx(one.achieved_epsilon)
    for a, b in zip(one.mechanisms, two.mechanisms, strict=True):
        assert b.sensitivity == pytest.approx(2 * a.sensitivity, rel=1e-12)
        assert b.scale == pytest.approx(2 * a.scale, rel=1e-12)
        assert b.rho == pytest.approx(a.rho, rel=1e-12)  # OpenDP's privacy map at k = 2
    assert {m.kind: m.sensitivity for m in two.mechanisms} == pytest.approx(
        {"count": 2, "histogram": 2, "sum": 100.0})
    # a patient's 2 rows in one category really move that count by 2 (L2 and L1): the
    # histogram's Δ must be 2, which OpenDP's map gives
    assert two.mechanisms[1].measurement.map(2) == pytest.approx(two.mechanisms[1].rho)
    df = pd.concat([table(300)] * 5, ignore_index=True)  # every patient 5 rows
    out = dp_stats(df, count=True, epsilon=20.0, patient_column="pid",
                   max_rows_per_patient=2)
    assert out["unit"] == "patient" and out["max_rows_per_patient"] == 2
    assert "at most 2 rows per patient" in out["unit_of_privacy"]
    (count,) = out["statistics"]
    assert count["sensitivity"] == 2
    assert count["value"] == pytest.approx(600, abs=6 * count["noise_std"])  # 2 of 5 rows


def test_without_a_patient_column_the_unit_is_the_row_and_says_so(tmp_path):
    out = dp_stats(table(), count=True)
    assert out["unit"] == "row" and out["max_rows_per_patient"] is None
    assert "per row" in out["note"] and "group privacy" in out["note"]
    book = BudgetLedger(tmp_path / "ledger.sqlite")
    rel = dp_stats(table(), count=True, patient_column="pid", max_rows_per_patient=3,
                   ledger=book)
    assert rel["ledger"]["unit"] == "patient"
    (entry,) = book.entries()
    assert entry["note"].startswith("dp-stats per patient (at most 3 rows each)")
    for k, words in ((0, "at least 1"), (-2, "at least 1"), (1.5, "whole number"),
                     (True, "whole number")):
        with pytest.raises(ConfigError, match=words):
            dp_stats(table(), count=True, patient_column="pid", max_rows_per_patient=k)
    with pytest.raises(ConfigError, match="needs --patient-column"):
        dp_stats(table(), count=True, max_rows_per_patient=2)


@pytest.mark.parametrize("kwargs, words", [
    ({"count": True, "epsilon": 0.0}, "Epsilon must be a positive number"),
    ({"count": True, "epsilon": -1.0}, "Epsilon must be a positive number"),
    ({"count": True, "epsilon": float("nan")}, "Epsilon must be a positive number"),
    ({"count": True, "delta": 1.0}, "Delta must lie strictly between 0 and 1"),
    ({"count": True, "delta": 0.0}, "Delta must lie strictly between 0 and 1"),
    ({}, "Ask for at least one statistic"),
    ({"means": [MeanQuery("age", 0, 1)] * 2}, "asked for twice"),
])
def test_impossible_requests_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        plan_stats(**kwargs)


def test_query_parsing_errors():
    assert parse_mean("blood:pressure:40:200") == MeanQuery("blood:pressure", 40.0, 200.0)
    for text, words in [("age:10", "COLUMN:LOWER:UPPER"), ("age:a:b", "must be numbers"),
                        ("age:5:5", "below its upper bound"), ("age:0:inf", "finite")]:
        with pytest.raises(ConfigError, match=words):
            parse_mean(text)
    assert parse_categories(["dx=a, b ,c"]) == {"dx": ("a", "b", "c")}
    for texts, words in [(["dx"], "COLUMN=a,b,c"), (["dx=a,,b"], "COLUMN=a,b,c"),
                         (["dx=a,a"], "listed twice"), (["dx=a", "dx=b"], "given twice"),
                         ([f"dx={','.join(map(str, range(1001)))}"], "at most 1000")]:
        with pytest.raises(ConfigError, match=words):
            parse_categories(texts)
    with pytest.raises(ConfigError, match="Declare the public categories of histogram "
                                          "column 'dx'"):
        histogram_queries(["dx"], {})
    with pytest.raises(ConfigError, match="no --histogram asks for it"):
        histogram_queries([], {"dx": ("a",)})


def test_data_errors_come_before_any_charge(tmp_path):
    df = table().assign(age=lambda d: d["age"].where(d.index != 7, "n/a"))
    book = BudgetLedger(tmp_path / "ledger.sqlite")
    with pytest.raises(DataError, match="'age' of t.csv has the non-numeric value 'n/a' in "
                                        "row 8"):
        dp_stats(df, means=[MeanQuery("age", 0, 100)], ledger=book, source="t.csv")
    with pytest.raises(DataError, match="no column 'weight'"):
        dp_stats(df, means=[MeanQuery("weight", 0, 100)], ledger=book)
    assert book.entries() == []
