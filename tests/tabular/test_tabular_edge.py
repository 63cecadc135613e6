"""Edge cases of ``privmed anonymize`` / ``dp-stats``: awkward tables, values and paths.

Every release is checked with our own group-by (not only pycanon), every released QI
value must contain the value it generalises, and the ledger must hold exactly what
was released.
"""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pandas as pd
import pytest
from cli_run import assert_one_sentence_error, privmed

from privmed.errors import BudgetExceededError, ConfigError, DataError
from privmed.privacy import BudgetLedger, compute_epsilon
from privmed.tabular.dpstats import (
    HistogramQuery,
    MeanQuery,
    dp_stats,
    parse_categories,
    parse_mean,
    plan_stats,
)
from privmed.tabular.hierarchy import (
    QuasiIdentifier,
    covers,
    parse_quasi,
    parse_released,
    to_codes,
)
from privmed.tabular.mondrian import anonymize
from privmed.tabular.table import date_values, numeric_values, read_table, table_id

Q = QuasiIdentifier


# ------------------------------------------------------------------ helpers


def write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def original_codes(df: pd.DataFrame, name: str, kind: str) -> np.ndarray:
    if kind == "numeric":
        return numeric_values(df, name, "t")
    if kind == "date":
        return to_codes(date_values(df, name, "t"), "date")
    return df[name].to_numpy().astype(str)


def check_release(df: pd.DataFrame, qis: list[QuasiIdentifier], k: int, sensitive=None,
                  l=None, **kw):  # noqa: E741
    """Anonymize ``df`` (which has a unique ``id`` column, kept) and check the release by
    hand: k and l by a plain group-by, every value inside its released value, kept and
    sensitive columns unchanged, nothing unnamed released."""
    result = anonymize(df, qis, k, sensitive=sensitive, l=l, keep=["id"], **kw)
    out = result.table
    names = [q.name for q in qis]
    dropped = set(kw.get("drop", ()))
    assert set(out.columns) == set(df.columns) - dropped
    assert len(out) == len(df)
    groups = out.groupby(names, sort=False)
    assert groups.size().min() >= k
    assert result.report["k_achieved"] == groups.size().min()
    if sensitive is not None:
        assert result.report["l_achieved"] == groups[sensitive].nunique().min()
        if l:
            assert groups[sensitive].nunique().min() >= l
    by_id = out.set_index("id").loc[df["id"]]
    if sensitive is not None:
        assert (by_id[sensitive].to_numpy() == df[sensitive].to_numpy()).all()
    for q in result.report["quasi_identifiers"]:  # kinds as given or inferred
        name, kind = q["name"], q["kind"]
        orig = original_codes(df, name, kind)
        for i, text in enumerate(by_id[name]):
            released = parse_released(text, kind)
            assert covers(released, np.asarray([orig[i]]))[0], (name, df[name][i], text)
    return result


def spends(path) -> list[dict]:
    return BudgetLedger(path).entries()


# ------------------------------------------------------------------ anonymize: the release


def test_random_tables_are_k_anonymous_l_diverse_and_cover_every_value():
    rng = np.random.default_rng(7)
    tried = 0
    for trial in range(60):
        n = int(rng.integers(2, 40))
        df = pd.DataFrame({
            "id": [f"r{i}" for i in range(n)],
            "num": [str(x) for x in np.round(rng.normal(0, 10.0 ** rng.integers(-2, 6), n),
                                             int(rng.integers(0, 3)))],
            "d": [str(np.datetime64("1700-01-01") + int(x))
                  for x in rng.integers(0, 200_000 if trial % 2 else 40, n)],
            "pc": ["".join(rng.choice(list("0123AB "), int(rng.integers(1, 6)))).strip() or "0"
                   for _ in range(n)],
            "cat": rng.choice(["F", "M", "*", "{x}", "a,b", "\\", ""], n),
            "s": rng.choice(list("abcd"), n),
        })
        k = int(rng.integers(2, n + 1))
        l = int(rng.integers(1, 4))  # noqa: E741
        if l > df["s"].nunique():
            continue
        qis = [Q("num", "numeric"), Q("d", "date"), Q("pc", "postcode"),
               Q("cat", "categorical")]
        check_release(df, qis, k, "s", l)
        tried += 1
    assert tried > 30


def test_k_equal_to_the_rows_is_one_class_and_k_above_is_refused():
    df = pd.DataFrame({"id": ["1", "2", "3"], "age": ["30", "31", "90"],
                       "dx": ["a", "b", "a"]})
    result = check_release(df, [Q("age", "numeric")], 3, "dx", 2)
    assert set(result.table["age"]) == {"[30-90]"}
    assert result.report["equivalence_classes"] == 1
    with pytest.raises(ConfigError, match="larger than the table's 3 rows"):
        anonymize(df, [Q("age", "numeric")], 4, sensitive="dx", keep=["id"])


def test_all_identical_quasi_identifiers_are_released_exactly():
    df = pd.DataFrame({"id": list("abcd"), "age": ["40"] * 4, "sex": ["F"] * 4,
                       "dx": ["x", "y", "x", "y"]})
    result = check_release(df, [Q("age"), Q("sex")], 2, "dx", 2)
    assert set(result.table["age"]) == {"40"} and set(result.table["sex"]) == {"F"}
    assert result.report["ncp_overall"] == 0


def test_negative_numbers_and_postcodes_of_all_shapes_are_covered():
    df = pd.DataFrame({
        "id": [str(i) for i in range(8)],
        "t": ["-40", "-3.5", "-3", "0", "2", "-1000", "7", "-7"],
        "postcode": ["123", "12345", "1234", "SW1A 1AA", "SW1A 2BB", "sw1a", "0", "00"],
        "s": list("abababab")})
    result = check_release(df, [Q("t", "numeric"), Q("postcode")], 2, "s", 2)
    assert any(v.startswith("[-") for v in result.table["t"])


def test_categorical_values_with_set_syntax_round_trip():
    values = ["*", "{a}", "\\x", "a,b", "a", "b", "", "}"]
    df = pd.DataFrame({"id": [str(i) for i in range(8)], "c": values, "s": list("abababab")})
    check_release(df, [Q("c", "categorical")], 2, "s")
    single = pd.DataFrame({"id": list("1234"), "c": ["*", "*", "{a}", "{a}"],
                           "s": list("abab")})
    out = check_release(single, [Q("c", "categorical")], 2, "s").table
    assert set(out["c"]) == {"\\*", "\\{a}"}  # a lone '*' is not "all values"


def test_empty_sensitive_values_count_as_a_value_for_l():
    df = pd.DataFrame({"id": list("1234"), "age": ["1", "2", "3", "4"],
                       "dx": ["HIV", "", "HIV", ""]})
    result = check_release(df, [Q("age", "numeric")], 2, "dx", 2)
    assert result.report["l_achieved"] == 2


def test_one_row_and_sensitive_with_one_value_are_clear_errors():
    one = pd.DataFrame({"age": ["3"], "dx": ["a"]})
    with pytest.raises(ConfigError, match="larger than the table's 1 rows"):
        anonymize(one, [Q("age")], 2, sensitive="dx")
    flat = pd.DataFrame({"age": ["1", "2", "3"], "dx": ["a"] * 3})
    with pytest.raises(ConfigError, match="1 distinct values"):
        anonymize(flat, [Q("age")], 2, sensitive="dx", l=2)


def test_small_and_precise_numbers_lie_in_their_released_range():
    for values in (["1e-11", "2e-11", "3e-11", "4e-11"],
                   ["0.12345678916", "0.12345678917", "0.5", "0.6"]):
        df = pd.DataFrame({"id": list("1234"), "x": values, "s": list("abab")})
        check_release(df, [Q("x", "numeric")], 2, "s")


def test_huge_numbers_are_refused_and_large_ones_have_a_finite_information_loss():
    df = pd.DataFrame({"id": list("12"), "x": ["-1e308", "1e308"], "s": list("ab")})
    with pytest.raises(DataError, match="huge value '-1e308' in row 1"):
        check_release(df, [Q("x", "numeric")], 2, "s")
    df["x"] = ["-1e299", "1e299"]  # spans stay finite below the limit
    result = check_release(df, [Q("x", "numeric")], 2, "s")
    assert result.report["ncp"]["x"] == pytest.approx(1.0)


def test_unit_separator_in_a_cell_does_not_break_the_pycanon_check():
    df = pd.DataFrame({"id": list("1234"), "a": ["x\x1fy", "x\x1fy", "x", "x"],
                       "b": ["z", "z", "y\x1fz", "y\x1fz"], "s": list("abab")})
    check_release(df, [Q("a", "categorical"), Q("b", "categorical")], 2, "s")


def test_dates_outside_the_pandas_range_are_dates():
    df = pd.DataFrame({"id": list("1234"), "bd": ["1600-01-01", "1600-02-01", "2300-01-01",
                                                   "2300-05-01"], "s": list("abab")})
    check_release(df, [Q("bd", "date")], 2, "s")


def test_quasi_identifier_names_may_contain_colons():
    assert parse_quasi("time:zone:categorical") == [Q("time:zone", "categorical")]


# ------------------------------------------------------------------ reading tables


def test_bom_crlf_and_quoted_commas_are_read_as_text(tmp_path):
    path = write(tmp_path / "t.csv", '\ufeffname, age ,dx\r\n"Smith, J", 030 ,"a,b"\r\n')
    df = read_table(path)
    assert list(df.columns) == ["name", "age", "dx"]
    assert df.iloc[0].tolist() == ["Smith, J", "030", "a,b"]


def test_rows_longer_than_the_header_are_refused(tmp_path):
    path = write(tmp_path / "t.csv", "name,age,dx\nAnn,34,flu,\nBob,51,HIV,\n")
    try:
        df = read_table(path)
    except DataError:
        return  # refused: as docs/tabular.md promises for ragged rows
    # or read with the empty trailing field ignored, but never shifted
    assert df["name"].tolist() == ["Ann", "Bob"] and df["dx"].tolist() == ["flu", "HIV"]


# ------------------------------------------------------------------ anonymize: the CLI


@pytest.fixture
def small(tmp_path):
    return write(tmp_path / "small.csv", "name,age,sex,dx\n" + "".join(
        f"P{i},{30 + i},{'FM'[i % 2]},{'abc'[i % 3]}\n" for i in range(12)))


def test_anonymize_cli_refusals_are_one_sentence_and_write_nothing(small, tmp_path):
    base = ["anonymize", str(small), "--quasi", "age,sex", "--sensitive", "dx"]
    out = tmp_path / "o.csv"
    before = small.read_bytes()
    link = tmp_path / "link.csv"
    os.symlink(small, link)
    (tmp_path / "folder").mkdir()
    cases = [
        (["--k", "2", "--drop", "name", "--out", str(out), "--report", str(out)],
         "Refusing to overwrite"),
        (["--k", "2", "--drop", "name", "--out", str(link)], "Refusing to overwrite"),
        (["--k", "2", "--drop", "name", "--out", str(tmp_path / "folder")], "is a folder"),
        (["--k", "2", "--drop", "name", "--keep", "name", "--out", str(out)],
         "both --drop and --keep"),
        (["--k", "2", "--drop", "name,nope", "--out", str(out)], "'nope'"),
        (["--k", "2", "--drop", "name,dx", "--out", str(out)], "both --sensitive and --drop"),
        (["--k", "13", "--drop", "name", "--out", str(out)], "12 rows"),
        (["--k", "2", "--l", "4", "--drop", "name", "--out", str(out)], "3 distinct"),
        (["--k", "1", "--drop", "name", "--out", str(out)], "at least 2"),
        (["--k", "2", "--l", "0", "--drop", "name", "--out", str(out)], "at least 1"),
    ]
    for extra, word in cases:
        assert_one_sentence_error(privmed(*base, *extra), 2, word)
    proc = privmed("anonymize", str(small), "--quasi", "age,sex,dx", "--sensitive", "dx",
                   "--k", "2", "--drop", "name", "--out", str(out))
    assert_one_sentence_error(proc, 2, "both --quasi and --sensitive")
    assert small.read_bytes() == before and not out.exists()


def test_anonymize_cli_bad_files_are_one_sentence(tmp_path):
    args = ["--k", "2", "--quasi", "age", "--out", str(tmp_path / "o.csv")]
    dup = write(tmp_path / "dup.csv", "age,age\n1,2\n3,4\n")
    latin = write(tmp_path / "latin.csv", "age,who\n1,café\n2,b\n", "latin-1")
    header = write(tmp_path / "header.csv", "age\n")
    for path, word in ((dup, "two columns named 'age'"), (latin, "UTF-8"),
                       (header, "no data rows"), (tmp_path / "none.csv", "does not exist")):
        assert_one_sentence_error(privmed("anonymize", str(path), *args), 2, word)


def test_anonymize_cli_columns_with_spaces_and_a_missing_out_folder(tmp_path):
    path = write(tmp_path / "t.csv", "birth year,the sex,dx\n" + "".join(
        f"{1950 + i},{'FM'[i % 2]},{'ab'[i % 2]}\n" for i in range(6)))
    out = tmp_path / "new" / "deeper" / "r.csv"
    proc = privmed("anonymize", str(path), "--quasi", "birth year:numeric,the sex",
                   "--sensitive", "dx", "--l", "2", "--k", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    released = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(released.columns) == ["birth year", "the sex", "dx"]
    sizes = released.groupby(["birth year", "the sex"]).size()
    assert sizes.min() >= 3
    assert released.groupby(["birth year", "the sex"])["dx"].nunique().min() >= 2


def test_anonymize_cli_huge_numbers_with_a_report(tmp_path):
    path = write(tmp_path / "t.csv", "x,s\n-1e308,a\n1e308,b\n")
    out, rep = tmp_path / "o.csv", tmp_path / "r.json"
    proc = privmed("anonymize", str(path), "--k", "2", "--quasi", "x:numeric", "--sensitive",
                   "s", "--out", str(out), "--report", str(rep))
    assert_one_sentence_error(proc, 2, "huge value")
    assert not out.exists() and not rep.exists()
    write(path, "x,s\n-1e299,a\n1e299,b\n")
    proc = privmed("anonymize", str(path), "--k", "2", "--quasi", "x:numeric", "--sensitive",
                   "s", "--out", str(out), "--report", str(rep))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rep.read_text())["k_achieved"] == 2


def test_anonymize_cli_unwritable_report_leaves_no_release(small, tmp_path):
    out = tmp_path / "o.csv"
    proc = privmed("anonymize", str(small), "--quasi", "age,sex", "--sensitive", "dx", "--k",
                   "2", "--drop", "name", "--out", str(out), "--report",
                   str(small / "r.json"))
    assert_one_sentence_error(proc, 2)
    assert not out.exists()


# ------------------------------------------------------------------ dp-stats: parsing


def test_dp_query_parsing_edge_cases():
    assert parse_categories(["dx=a=1, b "]) == {"dx": ("a=1", "b")}
    assert parse_mean("t:ime:-5:-1") == MeanQuery("t:ime", -5.0, -1.0)
    for bad in ("age:0:0", "age:5:1", "age:nan:1", "age:0:inf", "age", ":0:1", "age:x:1"):
        with pytest.raises(ConfigError):
            parse_mean(bad)
    for bad in ("dx=a,a", "dx=", "=a", "dx=a,,b", "dx"):
        with pytest.raises(ConfigError):
            parse_categories([bad])
    for eps, delta in ((0, 1e-6), (-1, 1e-6), (float("inf"), 1e-6), (float("nan"), 1e-6),
                       (1, 0), (1, 1), (1, float("nan"))):
        with pytest.raises(ConfigError):
            plan_stats(count=True, epsilon=eps, delta=delta)


def test_mean_bounds_with_an_infinite_width_are_refused():
    with pytest.raises(ConfigError):
        parse_mean("age:-1e308:1e308")


def test_means_stay_in_bounds_and_have_the_declared_noise():
    df = pd.DataFrame({"age": ["-50", "500", "20", "1e300", "-1e300"] * 20})
    release = dp_stats(df, count=True, means=[MeanQuery("age", 10, 30)], epsilon=1.0)
    z = release["noise_multiplier"]
    for s in release["statistics"]:
        if s["statistic"] == "mean":
            assert 10 <= s["value"] <= 30
            assert s["sensitivity"] == pytest.approx(10.0)
            assert s["noise_std"] == pytest.approx(10.0 * z)
    plan = plan_stats(means=[MeanQuery("age", -8.0, -4.0)], epsilon=2.0, delta=1e-5)
    summed = next(m for m in plan.mechanisms if m.kind == "sum")
    unit = 2.0 / 2 ** 20
    draws = np.array([summed.measurement([0] * 50) for _ in range(2000)], dtype=float) * unit
    assert abs(draws.std() / summed.scale - 1) < 0.08
    assert summed.scale == pytest.approx(2.0 * plan.noise_multiplier)


# ------------------------------------------------------------------ dp-stats: the ledger


@pytest.fixture
def cohort(tmp_path):
    return write(tmp_path / "cohort.csv", "pid,age,dx\n" + "".join(
        f"p{i % 15},{20 + i},{'abc'[i % 3]}\n" for i in range(20)))


def test_ledger_holds_exactly_the_released_history(cohort, tmp_path):
    ledger, out = tmp_path / "l.sqlite", tmp_path / "r0.json"
    proc = privmed("dp-stats", str(cohort), "--count", "--mean", "age:0:100", "--ledger",
                   str(ledger), "--budget-epsilon", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    df = read_table(cohort)
    dataset = table_id(df)
    second = dp_stats(df, histograms=[HistogramQuery("dx", ("a", "b", "zz"))],
                      patient_column="pid", ledger=BudgetLedger(ledger), epsilon=1.0)
    runs = [json.loads(out.read_text()), second]
    entries = spends(ledger)
    assert [e["status"] for e in entries] == ["committed", "committed"]
    assert [e["run_id"] for e in entries] == [r["ledger"]["run_id"] for r in runs]
    history = []
    for run, entry in zip(runs, entries, strict=True):
        h = [(x["noise_multiplier"], x["sample_rate"], x["steps"]) for x in run["history"]]
        assert [(x["noise_multiplier"], x["sample_rate"], x["steps"])
                for x in entry["history"]] == h
        assert run["achieved_epsilon"] == pytest.approx(compute_epsilon(h, 1e-6, "prv"))
        assert run["ledger"]["charged_epsilon"] == pytest.approx(run["achieved_epsilon"])
        assert run["ledger"]["dataset_id"] == dataset
        history += h
    assert runs[0]["history"][0]["steps"] == 2 and runs[1]["history"][0]["steps"] == 1
    spent = compute_epsilon(history, 1e-6, "prv")
    assert runs[1]["ledger"]["spent_epsilon"] == pytest.approx(spent)
    assert 1.0 < spent < 2.0  # composed, not added
    assert runs[1]["ledger"]["remaining_epsilon"] == pytest.approx(3 - spent)
    assert runs[1]["statistics"][0]["counts"].keys() == {"a", "b", "zz"}


def test_refusals_charge_nothing_and_write_nothing(cohort, tmp_path):
    ledger, out = tmp_path / "l.sqlite", tmp_path / "r.json"
    before = cohort.read_bytes()
    proc = privmed("dp-stats", str(cohort), "--count", "--ledger", str(ledger),
                   "--budget-epsilon", "0.5", "--out", str(out))
    assert_one_sentence_error(proc, 3, "Refused")
    assert spends(ledger) == [] and not out.exists()
    book = BudgetLedger(ledger)
    df = read_table(cohort)
    with pytest.raises(BudgetExceededError):
        dp_stats(df, count=True, ledger=book, epsilon=1.0)
    bad = pd.DataFrame({"age": ["1", "", "2"]})
    cases = [(bad, {"means": [MeanQuery("age", 0, 9)]}, DataError),
             (df, {"count": True, "patient_column": "nope"}, DataError),
             (df, {"histograms": [HistogramQuery("nope", ("a",))]}, DataError),
             (df, {"count": True, "epsilon": 1e-9}, ConfigError)]
    for table, kwargs, error in cases:
        with pytest.raises(error):
            dp_stats(table, ledger=book, **kwargs)
    assert spends(ledger) == [] and cohort.read_bytes() == before


def test_bad_ledgers_are_data_errors_and_stay_untouched(cohort, tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    junk = write(tmp_path / "junk.sqlite", "hello\n")
    for path, word in ((folder, "is a folder"), (junk, "not a readable privmed ledger"),
                       (cohort, "not a readable privmed ledger")):
        with pytest.raises(DataError, match=word):
            BudgetLedger(path)
    before = cohort.read_bytes()
    proc = privmed("dp-stats", str(cohort), "--count", "--ledger", str(cohort))
    assert_one_sentence_error(proc, 2, "not a readable privmed ledger")
    assert cohort.read_bytes() == before and junk.read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.csv", "dir", "junk.sqlite"]


def test_out_equal_to_the_ledger_is_refused(cohort, tmp_path):
    ledger = tmp_path / "l.sqlite"
    BudgetLedger(ledger).set_budget(table_id(read_table(cohort)), 5.0, 1e-6)
    proc = privmed("dp-stats", str(cohort), "--count", "--ledger", str(ledger), "--out",
                   str(ledger))
    try:  # the ledger must still be an SQLite ledger, whatever the exit code
        with sqlite3.connect(ledger) as conn:
            conn.execute("SELECT count(*) FROM budgets").fetchone()
    finally:
        conn.close()
    assert_one_sentence_error(proc, 2, "ledger")


def test_unwritable_out_is_refused_before_the_charge(cohort, tmp_path):
    ledger = tmp_path / "l.sqlite"
    proc = privmed("dp-stats", str(cohort), "--count", "--ledger", str(ledger), "--out",
                   str(cohort / "r.json"))
    assert_one_sentence_error(proc, 2, "Cannot write")
    assert spends(ledger) == []
