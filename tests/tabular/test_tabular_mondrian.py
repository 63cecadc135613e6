"""Mondrian k-anonymity / l-diversity on real pandas tables, checked with real pycanon."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from pycanon import anonymity

from privmed.errors import ConfigError, DataError
from privmed.tabular.hierarchy import (
    QuasiIdentifier,
    covers,
    date_label,
    infer_kind,
    parse_quasi,
    parse_released,
    to_codes,
)
from privmed.tabular.mondrian import anonymize, partition

QUASI = parse_quasi("age:numeric,weight:numeric,birth:date,zip:postcode,sex:categorical")
ZIPS = ["02139", "02138", "02141", "0214", "10001", "10002", "1003", "94103", "94110", "SW1A"]


def random_table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    birth = np.datetime64("1930-01-01") + rng.integers(0, 26000, n).astype("timedelta64[D]")
    return pd.DataFrame({
        "rid": [f"r{i}" for i in range(n)],
        "age": rng.integers(18, 95, n).astype(str),
        "weight": np.round(rng.normal(70, 15, n), 1).astype(str),
        "birth": np.datetime_as_string(birth, unit="D"),
        "zip": rng.choice(ZIPS, n),
        "sex": rng.choice(["F", "M", "X"], n, p=[0.49, 0.49, 0.02]),
        "dx": rng.choice(list("ABCDE"), n, p=[0.5, 0.2, 0.15, 0.1, 0.05]),
    })


def pycanon_k_l(released: pd.DataFrame, qi: list[str], sa: str) -> tuple[int, int]:
    """pycanon on the released QI tuple (one column: its product enumeration is too slow)."""
    one = pd.DataFrame({"qi": released[qi].astype(str).apply(tuple, axis=1).map(hash),
                        "sa": released[sa].to_numpy()})
    return anonymity.k_anonymity(one, ["qi"]), anonymity.l_diversity(one, ["qi"], ["sa"])


@pytest.mark.parametrize("n, seed, k, l", [
    (40, 0, 3, 2), (300, 1, 5, 2), (1000, 2, 10, 3), (2500, 3, 4, None), (2500, 4, 2, 2)])
def test_release_is_k_anonymous_and_l_diverse_by_pycanon(n, seed, k, l):  # noqa: E741
    df = random_table(n, seed)
    res = anonymize(df, QUASI, k, sensitive="dx", l=l, keep=["rid"])
    qi = [q.name for q in QUASI]
    got_k, got_l = pycanon_k_l(res.table, qi, "dx")
    assert got_k >= k and got_k == res.report["k_achieved"]
    assert got_l >= (l or 1) and got_l == res.report["l_achieved"]
    assert res.report["checked_with"].startswith("pycanon")
    assert len(res.table) == n and res.report["suppressed_rows"] == 0
    # not trivially anonymous: Mondrian keeps cutting while it may
    assert res.report["equivalence_classes"] > n / (4 * k)


def test_pycanon_on_the_unmodified_released_columns():
    df = random_table(80, 7)
    quasi = parse_quasi("age:numeric,zip:postcode,sex:categorical")
    res = anonymize(df, quasi, 4, sensitive="dx", l=2,
                    drop=["rid", "weight", "birth"])
    assert anonymity.k_anonymity(res.table, ["age", "zip", "sex"]) >= 4
    assert anonymity.l_diversity(res.table, ["age", "zip", "sex"], ["dx"]) >= 2


@pytest.mark.parametrize("seed", [0, 1])
def test_every_original_value_lies_in_its_released_value(seed):
    df = random_table(600, seed)
    res = anonymize(df, QUASI, 5, sensitive="dx", l=2, keep=["rid"])
    original = df.set_index("rid").loc[res.table["rid"]]
    checked = 0
    for q in QUASI:
        codes = to_codes(original[q.name].to_numpy() if q.kind != "numeric"
                         else original[q.name].astype(float).to_numpy(), q.kind)
        released = res.table[q.name].to_numpy()
        for value in np.unique(released):
            rows = released == value
            assert covers(parse_released(value, q.kind), codes[rows]).all(), (q, value)
            checked += rows.sum()
    assert checked == len(QUASI) * len(df)
    # the sensitive and kept columns go out unchanged, row by row
    assert (original["dx"].to_numpy() == res.table["dx"].to_numpy()).all()


def test_information_loss_falls_as_k_falls():
    df = random_table(1500, 11)
    reports = [anonymize(df, QUASI, k, sensitive="dx", keep=["rid"], check=False).report
               for k in (50, 25, 10, 5, 2)]
    ncp = [r["ncp_overall"] for r in reports]
    dm = [r["discernibility"] for r in reports]
    classes = [r["equivalence_classes"] for r in reports]
    assert ncp == sorted(ncp, reverse=True) and ncp[0] > 2 * ncp[-1]
    assert dm == sorted(dm, reverse=True) and classes == sorted(classes)
    # l-diversity costs information at the same k
    with_l = anonymize(df, QUASI, 5, sensitive="dx", l=3, keep=["rid"], check=False).report
    assert with_l["ncp_overall"] > reports[3]["ncp_overall"]


def test_exact_metrics_on_a_tiny_table():
    df = pd.DataFrame({"age": ["20", "30", "40", "50"], "dx": ["a", "b", "a", "b"]})
    res = anonymize(df, [QuasiIdentifier("age", "numeric")], 2, sensitive="dx", l=2)
    assert res.table["age"].tolist() == ["[20-30]", "[20-30]", "[40-50]", "[40-50]"]
    r = res.report
    assert r["ncp"]["age"] == pytest.approx(10 / 30) and r["discernibility"] == 8
    assert (r["k_achieved"], r["l_achieved"], r["equivalence_classes"]) == (2, 2, 2)
    assert r["normalized_average_class_size"] == 1.0


def test_partition_cuts_one_dimension_at_value_boundaries():
    values = np.repeat(np.arange(20), 5).astype(float)[:, None]  # 20 values, 5 rows each
    labels = partition(values, k=10)
    sizes = np.bincount(labels)
    assert sizes.min() >= 10 and len(sizes) >= 5
    for lab in range(len(sizes)):  # strict: no value is split between partitions
        v = np.unique(values[labels == lab, 0])
        assert not np.isin(v, values[labels != lab, 0]).any()


def test_release_does_not_depend_on_input_row_order():
    df = random_table(400, 5)
    a = anonymize(df, QUASI, 4, sensitive="dx", drop=["rid"]).table
    b = anonymize(df.sample(frac=1, random_state=3).reset_index(drop=True), QUASI, 4,
                  sensitive="dx", drop=["rid"]).table
    pd.testing.assert_frame_equal(a, b)


def test_impossible_k_and_l_are_clear_errors():
    df = random_table(30, 0)
    with pytest.raises(ConfigError, match="k = 31 is larger than the table's 30 rows"):
        anonymize(df, QUASI, 31, sensitive="dx", keep=["rid"])
    with pytest.raises(ConfigError, match="l = 6 is larger than the 5 distinct values of "
                                          "the sensitive column 'dx'"):
        anonymize(df.assign(dx=list("ABCDE") * 6), QUASI, 2, sensitive="dx", l=6,
                  keep=["rid"])
    with pytest.raises(ConfigError, match="k must be a whole number of at least 2"):
        anonymize(df, QUASI, 1, sensitive="dx", keep=["rid"])
    with pytest.raises(ConfigError, match="needs the sensitive column"):
        anonymize(df, QUASI, 2, l=2, drop=["rid", "dx"])


def test_every_column_needs_a_role():
    df = random_table(30, 0).assign(name="x", mrn="y")
    with pytest.raises(ConfigError, match=r"Column\(s\) 'name', 'mrn' of t.csv are not named"
                                          r": drop direct identifiers with --drop"):
        anonymize(df, QUASI, 2, sensitive="dx", keep=["rid"], source="t.csv")
    with pytest.raises(ConfigError, match="'age' is named by both --quasi and --keep"):
        anonymize(df, QUASI, 2, sensitive="dx", keep=["rid", "age"], drop=["name", "mrn"])
    with pytest.raises(DataError, match="no column 'nope' named by --drop"):
        anonymize(df, QUASI, 2, sensitive="dx", keep=["rid"], drop=["name", "mrn", "nope"])
    res = anonymize(df, QUASI, 2, sensitive="dx", keep=["rid"], drop=["name", "mrn"])
    assert "name" not in res.table and "mrn" not in res.table


def test_bad_quasi_identifier_values_are_data_errors():
    df = random_table(30, 0)
    with pytest.raises(DataError, match="Column 'sex' of the table has the non-numeric "
                                        "value"):
        anonymize(df, parse_quasi("sex:numeric"), 2, sensitive="dx",
                  keep=["rid", "age", "weight", "birth", "zip"])
    df.loc[4, "zip"] = "021*"
    with pytest.raises(DataError, match=r"has a '\*' in row 5"):
        anonymize(df, QUASI, 2, sensitive="dx", keep=["rid"])


def test_parse_quasi_and_inferred_kinds():
    assert parse_quasi(" age:numeric, sex ") == [QuasiIdentifier("age", "numeric"),
                                                 QuasiIdentifier("sex", None)]
    with pytest.raises(ConfigError, match="Unknown quasi-identifier kind 'number'"):
        parse_quasi("age:number")
    with pytest.raises(ConfigError, match="'age' is named twice"):
        parse_quasi("age,age:numeric")
    df = random_table(50, 0)
    assert [infer_kind(df[c], c) for c in ("age", "weight", "birth", "zip", "sex")] == [
        "numeric", "numeric", "date", "postcode", "categorical"]
    inferred = anonymize(df, parse_quasi("age,birth,zip,sex,weight"), 3, sensitive="dx",
                         keep=["rid"]).report["quasi_identifiers"]
    assert [q["kind"] for q in inferred] == ["numeric", "date", "postcode", "categorical",
                                             "numeric"]


def test_date_labels_coarsen_only_where_the_span_at_most_doubles():
    d = date
    assert date_label(d(1980, 3, 2), d(1980, 3, 2))[0] == "1980-03-02"
    assert date_label(d(1980, 3, 2), d(1980, 3, 20)) == ("1980-03", (d(1980, 3, 1),
                                                                     d(1980, 3, 31)))
    assert date_label(d(1980, 3, 2), d(1980, 3, 9))[0] == "[1980-03-02, 1980-03-09]"
    assert date_label(d(1980, 2, 1), d(1980, 9, 30))[0] == "1980"
    assert date_label(d(1980, 2, 1), d(1980, 4, 30))[0] == "[1980-02-01, 1980-04-30]"
    assert date_label(d(1979, 12, 1), d(1980, 1, 5))[0] == "[1979-12-01, 1980-01-05]"
    for text in ("1980-03", "1980", "[1979-12-01, 1980-01-05]", "1980-02-29"):
        r = parse_released(text, "date")
        days = to_codes(np.array(["1980-02-29", "1980-03-15", "1980-01-01"]), "date")
        assert covers(r, days).any()
    assert covers(parse_released("1980-03", "date"),
                  to_codes(np.array(["1980-02-29", "1980-03-31"]), "date")).tolist() == [
        False, True]


def test_postcode_and_categorical_release_forms():
    df = pd.DataFrame({"zip": ["02139", "02141", "0214", "02139"], "c": list("abcd"),
                       "s": list("ABAB")})
    res = anonymize(df, parse_quasi("zip:postcode"), 4, sensitive="s", keep=["c"])
    assert set(res.table["zip"]) == {"021**"}
    assert res.report["ncp"]["zip"] == 1.0  # the prefix covers all 3 distinct postcodes
    r = parse_released("021**", "postcode")
    assert covers(r, np.array(["02100", "0219", "02200", "021000"])).tolist() == [
        True, True, False, False]
    # alphabetical order: "*" < "a,b" < "z" < "{x"; k = 4 cuts it in two sets
    cats = pd.DataFrame({"c": ["*", "a,b", "z", "{x"] * 2, "s": list("ABABABAB")})
    cat = anonymize(cats, parse_quasi("c:categorical"), 4, sensitive="s").table
    assert set(cat["c"]) == {"{*,a\\,b}", "{z,\\{x}"}  # "*" is plain inside a set
    assert cat.groupby("c")["s"].nunique().min() == 2
    singles = anonymize(cats, parse_quasi("c:categorical"), 2, sensitive="s").table
    assert set(singles["c"]) == {"\\*", "a,b", "z", "\\{x"}
    for value in set(singles["c"]) | set(cat["c"]):
        parsed = parse_released(value, "categorical")
        assert covers(parsed, cats["c"].to_numpy()).sum() in (2, 4)
    assert parse_released("{\\*,a\\,b}", "categorical").values == {"*", "a,b"}
    assert parse_released("\\*", "categorical").values == {"*"}
    assert parse_released("*", "categorical").values is None
    with pytest.raises(DataError, match="not a released numeric value"):
        parse_released("[1-", "numeric")
