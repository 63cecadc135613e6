"""The command line as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_run import assert_one_sentence_error, privmed


def test_train_writes_results_model_and_report(tmp_path):
    out = tmp_path / "run"
    proc = privmed("train", "--data", "synthetic", "--epochs", "2", "--epsilon", "2",
                   "--out", str(out), "--ledger", str(tmp_path / "l.sqlite"),
                   "--budget-epsilon", "5")
    assert proc.returncode == 0, proc.stderr
    assert "Model: scatter-linear (the default" in proc.stdout  # the default is named
    assert "ε is per image" in proc.stdout and "2 images (ε = " in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "privmed.results/2"
    p = results["privacy"]
    assert p["enabled"] and p["accountant"] == "prv"
    assert 1.98 <= p["epsilon"] <= 2.0
    assert p["delta"] < 1 / results["data"]["sizes"]["train"]
    assert sum(h["steps"] for h in p["history"]) == results["training"]["epochs"][-1]["steps"]
    assert p["ledger"]["budget_epsilon"] == 5
    assert p["ledger"]["remaining_epsilon"] == pytest.approx(5 - p["epsilon"], abs=0.05)
    for split in ("val", "test"):
        m = results["metrics"][split]
        assert 0 <= m["roc_auc"] <= 1 and 0 <= m["accuracy"] <= 1 and -1 <= m["mcc"] <= 1
    html = (out / "report.html").read_text()
    assert f"{p['epsilon']:.2f}" in html
    assert html.count("data:image/png;base64") >= 3
    assert (out / "model.pt").exists()

    again = privmed("evaluate", str(out), "--data", "synthetic", "--split", "test")
    assert again.returncode == 0, again.stderr
    assert f"{results['metrics']['test']['roc_auc']:.3f}" in again.stdout
    # kept in the run as a named external test, the run's own test metrics untouched
    assert "Recorded external test 'synthetic/test'" in again.stdout
    kept = json.loads((out / "results.json").read_text())
    assert kept["metrics"]["test"] == results["metrics"]["test"]
    assert kept["external_tests"]["synthetic/test"]["metrics"]["roc_auc"] == \
        results["metrics"]["test"]["roc_auc"]
    assert "External test sets" in (out / "report.html").read_text()

    shown = privmed("ledger", "show", str(tmp_path / "l.sqlite"), "--runs")
    assert shown.returncode == 0, shown.stderr
    assert results["data"]["dataset_id"] in shown.stdout
    # budget, spent and remaining are shown as numbers, and the run is listed
    assert "5.000" in shown.stdout and f"{p['epsilon']:.3f}" in shown.stdout
    assert f"{p['noise_multiplier']:.4g}" in shown.stdout

    # Alone it fits the budget of 5; composed with the first run it does not.
    refused = privmed("train", "--data", "synthetic", "--epochs", "2", "--epsilon", "5",
                      "--out", str(tmp_path / "run2"), "--ledger", str(tmp_path / "l.sqlite"))
    assert_one_sentence_error(refused, 3, "over its budget")
    assert not (tmp_path / "run2" / "checkpoint.pt").exists()

    rewritten = privmed("report", str(out))
    assert rewritten.returncode == 0


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    assert privmed("train", "--data", "synthetic", "--no-dp", "--epochs", "1", "--out",
                   str(out)).returncode == 0
    before = (out / "results.json").read_bytes()
    proc = privmed("train", "--data", "synthetic", "--no-dp", "--epochs", "1", "--out", str(out))
    assert_one_sentence_error(proc, 2, "finished run")
    assert (out / "results.json").read_bytes() == before


def test_data_inspect_and_split(tmp_path):
    proc = privmed("data", "inspect", "synthetic")
    assert proc.returncode == 0 and "normal" in proc.stdout
    proc = privmed("data", "split", "synthetic", "--sites", "3", "--scheme", "dirichlet",
                   "--alpha", "0.3", "--out", str(tmp_path / "sites"))
    assert proc.returncode == 0, proc.stderr
    sizes = [len(np.load(tmp_path / "sites" / f"site-{i}.npz")["train_labels"])
             for i in (1, 2, 3)]
    assert sum(sizes) == 1200
    site = privmed("data", "inspect", str(tmp_path / "sites" / "site-1.npz"))
    assert site.returncode == 0, site.stderr
    # the coordinator's held-out file holds a test split, not images posing as train
    with np.load(tmp_path / "sites" / "test.npz") as held:
        assert "test_images" in held.files and "train_images" not in held.files
    held = privmed("data", "inspect", str(tmp_path / "sites" / "test.npz"))
    assert held.returncode == 0 and "test" in held.stdout, held.stderr


@pytest.mark.parametrize("args,code,words", [
    (["train", "--data", "/nonexistent/images"], 2, ["/nonexistent/images"]),
    (["train", "--data", "synthetic", "--epsilon", "-1"], 2, ["psilon"]),
    (["train", "--data", "synthetic", "--delta", "0.5"], 2, ["elta"]),
    (["train", "--data", "synthetic", "--model", "no-such-net"], 2, ["no-such-net"]),
    (["train", "--data", "synthetic", "--no-dp", "--epsilon", "1"], 2, ["--no-dp"]),
    (["train", "--no-dp"], 2, ["needs --data", "'synthetic'"]),  # no silent default
    (["evaluate", "/nonexistent/run"], 2, ["needs --data"]),
    (["ledger", "show", "/nonexistent/ledger.sqlite"], 2, ["does not exist"]),
    (["evaluate", "/nonexistent/run", "--data", "synthetic"], 2, ["does not exist"]),
])
def test_bad_input_is_one_sentence(tmp_path, args, code, words):
    assert_one_sentence_error(privmed(*args, "--out", str(tmp_path / "o"))
                              if args[0] == "train" else privmed(*args), code, *words)


def test_corrupt_npz_names_the_file(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert_one_sentence_error(privmed("data", "inspect", str(bad)), 2, "broken.npz")
