"""``privmed audit membership`` as a user runs it, and the report's audit section."""

from __future__ import annotations

import json

import pytest
from cli_run import assert_one_sentence_error, privmed


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
    assert "per image" in proc.stdout  # the data names no patients: the unit is the image
    results = json.loads((dp_run / "results.json").read_text())
    m = results["audit"]["membership"]
    assert m["claimed_epsilon"] == pytest.approx(results["privacy"]["epsilon"])
    assert m["unit"] == m["claimed_unit"] == "image"
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
                        ((str(dp_run), "--data", "synthetic", "--shadows", "1"), "shadow"),
                        ((str(dp_run), "--data", "synthetic", "--unit", "patient"),
                         "patient of every training image"),
                        ((str(dp_run), "--data", "synthetic", "--unit", "person"),
                         "'person'")):
        assert_one_sentence_error(privmed("audit", "membership", *args), 2, words)


def test_inversion_audit_lands_in_the_report_with_its_grid(dp_run, tmp_path):
    proc = privmed("audit", "inversion", "--data", "synthetic", "--run", str(dp_run),
                   "--batch-sizes", "1", "--steps", "150")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((dp_run / "results.json").read_text())["audit"]["inversion"]["rows"]
    by = {r["scenario"]: r for r in rows}
    assert set(by) == {"plain", "dp", "secure"}
    assert by["plain"]["psnr_mean"] > by["dp"]["psnr_mean"] + 10  # the defence shows
    assert (dp_run / "audit-inversion.png").read_bytes().startswith(b"\x89PNG")
    page = (dp_run / "report.html").read_text()
    assert "Gradient inversion (Geiping et al. 2020)" in page and 'alt="reconstructions"' in page
    assert "Privacy audit: claimed vs measured" in page  # the membership audit is kept
    out = tmp_path / "inv"
    proc = privmed("audit", "inversion", "--data", "synthetic", "--out", str(out),
                   "--batch-sizes", "2", "--scenarios", "plain", "--steps", "20")
    assert proc.returncode == 0, proc.stderr
    assert (out / "inversion.json").is_file() and (out / "inversion.png").is_file()
    # the grid shows the node's images (patient data) and their reconstructions: owner only
    for grid in (out / "inversion.png", dp_run / "audit-inversion.png"):
        assert grid.stat().st_mode & 0o777 == 0o600


def test_inversion_audit_errors_are_one_sentence(tmp_path):
    for args, words in ((("--batch-sizes", "one"), "--batch-sizes"),
                        (("--scenarios", "bogus"), "bogus"),
                        (("--run", str(tmp_path)), "results.json")):
        assert_one_sentence_error(privmed("audit", "inversion", "--data", "synthetic",
                                          "--steps", "5", *args), 2, words)
