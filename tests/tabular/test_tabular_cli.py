"""``privmed anonymize | dp-stats | linkage-demo`` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from cli_run import assert_one_sentence_error, privmed
from pycanon import anonymity

from privmed.privacy import BudgetLedger, compute_epsilon
from privmed.tabular.synthetic import DIAGNOSES, make_cohort

QUASI = "age:numeric,birth_date:date,postcode:postcode,sex:categorical"


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    path = tmp_path_factory.mktemp("tabular") / "patients.csv"
    make_cohort(800, 8000, seed=3).patients.to_csv(path, index=False)
    return path


def test_anonymize_writes_a_k_anonymous_l_diverse_release_and_its_report(patients, tmp_path):
    before = patients.read_bytes()
    out, report = tmp_path / "released.csv", tmp_path / "report.json"
    proc = privmed("anonymize", str(patients), "--k", "5", "--quasi", QUASI, "--sensitive",
                   "diagnosis", "--l", "2", "--drop", "name", "--drop", "mrn", "--out",
                   str(out), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "achieved k (pycanon" in proc.stdout and "NCP overall" in proc.stdout
    released = pd.read_csv(out, dtype=str)
    assert list(released.columns) == ["birth_date", "age", "sex", "postcode", "diagnosis"]
    qi = ["age", "birth_date", "postcode", "sex"]
    one = pd.DataFrame({"qi": pd.factorize(released[qi].apply(tuple, axis=1))[0],
                        "dx": released["diagnosis"]})
    assert anonymity.k_anonymity(one, ["qi"]) >= 5
    assert anonymity.l_diversity(one, ["qi"], ["dx"]) >= 2
    rep = json.loads(report.read_text())
    assert rep["k_achieved"] >= 5 and rep["l_achieved"] >= 2 and rep["rows"] == 800
    assert set(rep["ncp"]) == set(qi) and rep["dropped"] == ["name", "mrn"]
    assert patients.read_bytes() == before


def test_anonymize_errors_are_one_sentence(patients, tmp_path):
    base = ["anonymize", str(patients), "--quasi", QUASI, "--sensitive", "diagnosis"]
    ids = ["--drop", "name,mrn", "--out", str(tmp_path / "o.csv")]
    before = patients.read_bytes()
    cases = [
        (base + ["--k", "5", "--out", str(tmp_path / "o.csv")], "'mrn', 'name'", "--drop"),
        (base + ["--k", "801"] + ids, "larger than the table's 800 rows"),
        (base + ["--k", "5", "--l", "9"] + ids, "8 distinct values"),
        (base + ["--k", "5", "--drop", "name,mrn", "--out", str(patients)],
         "Refusing to overwrite"),
    ]
    for args, *words in cases:
        assert_one_sentence_error(privmed(*args), 2, *words)
    assert patients.read_bytes() == before and not (tmp_path / "o.csv").exists()


def test_dp_stats_charges_the_ledger_and_refuses_to_overspend(patients, tmp_path):
    ledger, out = tmp_path / "ledger.sqlite", tmp_path / "stats.json"
    args = ["dp-stats", str(patients), "--count", "--histogram", "diagnosis", "--categories",
            "diagnosis=" + ",".join(DIAGNOSES), "--mean", "age:18:90", "--ledger", str(ledger)]
    proc = privmed(*args, "--budget-epsilon", "1.2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "count of HIV" in proc.stdout and "charged ε 0.99" in proc.stdout
    release = json.loads(out.read_text())
    stats = {s["statistic"]: s for s in release["statistics"]}
    assert stats["count"]["value"] == pytest.approx(800, abs=6 * stats["count"]["noise_std"])
    assert 18 <= stats["mean"]["value"] <= 90
    assert set(stats["histogram"]["counts"]) == set(DIAGNOSES)
    (entry,) = BudgetLedger(ledger).entries()
    z = release["noise_multiplier"]
    assert entry["dataset_id"] == release["ledger"]["dataset_id"]
    assert entry["epsilon"] == pytest.approx(compute_epsilon([(z, 1.0, 3)], 1e-6))
    again = tmp_path / "again.json"
    proc = privmed(*args, "--out", str(again))
    assert_one_sentence_error(proc, 3, "Refused", release["ledger"]["dataset_id"])
    assert not again.exists() and len(BudgetLedger(ledger).entries()) == 1


def test_dp_stats_without_a_ledger_says_so_and_rejects_bad_requests(patients):
    proc = privmed("dp-stats", str(patients), "--count", "--patient-column", "mrn")
    assert proc.returncode == 0, proc.stderr
    assert "No ledger: nothing was charged" in proc.stdout
    proc = privmed("dp-stats", str(patients), "--histogram", "diagnosis", "--mean", "age:9:1")
    assert_one_sentence_error(proc, 2, "Declare the public categories")


def test_dp_stats_bounds_rows_per_patient_and_names_the_unit(patients, tmp_path):
    out = tmp_path / "k2.json"
    proc = privmed("dp-stats", str(patients), "--count", "--patient-column", "mrn",
                   "--max-rows-per-patient", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "at most 2 rows per patient via" in proc.stdout
    release = json.loads(out.read_text())
    assert release["unit"] == "patient" and release["max_rows_per_patient"] == 2
    assert release["statistics"][0]["sensitivity"] == 2
    proc = privmed("dp-stats", str(patients), "--count")
    assert proc.returncode == 0, proc.stderr
    assert "The guarantee is per row" in proc.stdout and "group privacy" in proc.stdout
    for k in ("0", "-1"):
        proc = privmed("dp-stats", str(patients), "--count", "--patient-column", "mrn",
                       "--max-rows-per-patient", k)
        assert_one_sentence_error(proc, 2, "--max-rows-per-patient", "at least 1")
    proc = privmed("dp-stats", str(patients), "--count", "--max-rows-per-patient", "3")
    assert_one_sentence_error(proc, 2, "needs --patient-column")


def test_linkage_demo_prints_and_writes_the_figures(tmp_path):
    out = tmp_path / "demo.json"
    proc = privmed("linkage-demo", "--patients", "600", "--population", "6000", "--k", "3",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Differencing attack" in proc.stdout and "names dropped" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["releases"]["names dropped"]["reidentified_fraction"] > 0.9
    assert figures["releases"]["k=3"]["uniquely_reidentified"] == 0
    assert figures["differencing"]["exact_accuracy"] == 1.0
