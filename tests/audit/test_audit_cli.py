"""``privmed audit membership`` as a user runs it, and the report's audit section."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "COLUMNS": "200", "PRIVMED_CACHE": ""}


def privmed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privmed", *args], capture_output=True,
                          text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    proc = privmed("train", "--data", "synthetic", "--epochs", "2", "--epsilon", "2",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_membership_audit_lands_in_results_and_report(dp_run):
    proc = privmed("audit", "membership", str(dp_run), "--data", "synthetic", "--shadows", "2",
                   "--max-examples", "200")
    assert proc.returncode == 0, proc.stderr
    assert "Claimed ε = " in proc.stdout and "lira-online" in proc.stdout
    results = json.loads((dp_run / "results.json").read_text())
    m = results["audit"]["membership"]
    assert m["claimed_epsilon"] == pytest.approx(results["privacy"]["epsilon"])
    assert m["examples"] == 200 and m["shadows"] == 2
    assert m["consistent"] and 0 <= m["eps_lb"] <= m["claimed_epsilon"]
    assert results["metrics"]["test"]["roc_auc"] is not None  # the training record is kept
    page = (dp_run / "report.html").read_text()
    assert "Privacy audit: claimed vs measured" in page
    assert f"Claimed ε = {m['claimed_epsilon']:.2f}" in page
    assert "Membership attacks, log-log ROC" in page
    # the audit sits right under the claimed epsilon
    assert page.index("Differential privacy") < page.index("Privacy audit") < page.index(
        "Plots")


def test_membership_audit_errors_are_one_sentence(dp_run, tmp_path):
    for args, words in (((str(tmp_path / "nope"), "--data", "synthetic"), "results.json"),
                        ((str(dp_run), "--data", "synthetic", "--shadows", "1"), "shadow")):
        proc = privmed("audit", "membership", *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("Error:")
        assert words in proc.stderr
