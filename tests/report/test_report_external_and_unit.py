"""External test sets in results.json and the report; the privacy unit, group privacy and
DP warnings in the privacy box; what the seed does and does not fix."""

from __future__ import annotations

import copy
import json
import math

import pytest
from report_samples import make_results

from privmed.privacy.group import group_privacy, group_privacy_table
from privmed.report import read_results, render_report, write_report, write_results
from privmed.report.external import external_test_entry, record_external_test
from privmed.report.results import ResultsSchemaError, validate_results
from privmed.training.privacy_notes import group_rows, privacy_unit_lines


def _external(n: int = 300) -> dict:
    m = copy.deepcopy(make_results()["metrics"]["test"])
    m["n"] = n
    m["confusion_matrix"] = [[n // 2 - 10, 10], [20, n - n // 2 - 20]]
    return external_test_entry(source="hospital-b/", how="all of it: it has no splits", n=n,
                               dataset_id="0123456789abcdef", metrics=m)


def test_group_privacy_is_the_chained_bound():
    eps, delta = 1.0, 1e-5
    assert group_privacy(eps, delta, 1) == pytest.approx((1.0, 1e-5))
    for k in (2, 5, 10):
        eps_k, delta_k = group_privacy(eps, delta, k)
        exact = delta * sum(math.exp(i * eps) for i in range(k))  # δ(1 + e^ε + ... )
        assert eps_k == k * eps and delta_k == pytest.approx(exact, rel=1e-12)
        assert delta_k <= k * math.exp((k - 1) * eps) * delta  # the textbook bound
    assert group_privacy(3.0, 1e-4, 10)[1] == 1.0  # capped: no guarantee left
    assert group_privacy(30.0, 1e-5, 10)[1] == 1.0  # no float overflow
    assert group_privacy(0.0, 1e-5, 4) == (0.0, pytest.approx(4e-5))
    assert [r["images"] for r in group_privacy_table(1.0, 1e-5)] == [2, 5, 10]


def test_console_and_report_say_epsilon_is_per_image_with_group_figures():
    r = make_results()
    p = r["privacy"]
    p["group_privacy"] = group_rows(p["epsilon"], p["delta"], largest_patient=4)
    p["unit"], p["warnings"] = "image", []
    validate_results(r)
    lines = privacy_unit_lines(p)
    assert lines[0].startswith("ε is per image")
    e2, d2 = group_privacy(p["epsilon"], p["delta"], 2)
    assert f"2 images (ε = {e2:.3g}, δ = {d2:.2g})" in lines[0]
    assert "largest training patient here has 4 images" in lines[1]
    page = render_report(r)
    assert "Privacy unit: one image." in page and "Group privacy for a patient" in page
    assert "4 (the largest patient here)" in page
    assert f"{e2:.3g}" in page and f"{d2:.2g}" in page


def test_report_of_an_older_run_still_states_the_unit_and_a_full_batch():
    r = make_results()
    r["privacy"]["sample_rate"] = 1.0
    page = render_report(r)
    assert "Privacy unit: one image." in page
    assert "no privacy amplification by subsampling" in page
    assert "Privacy unit" not in render_report(make_results("nodp"))


def test_reproducibility_says_what_the_seed_fixes():
    page = render_report(make_results())
    assert "initialisation" in page and "not reproducible by design" in page
    assert "not reproducible" not in render_report(make_results("nodp"))


def test_external_test_is_recorded_beside_the_runs_own_metrics(tmp_path):
    r = make_results()
    write_results(tmp_path, r)
    write_report(tmp_path)
    own_test = copy.deepcopy(r["metrics"]["test"])
    report, replaced = record_external_test(tmp_path, "hospital-b", _external())
    assert not replaced and report.name == "report.html"
    again = read_results(tmp_path)
    assert again["metrics"]["test"] == json.loads(json.dumps(own_test))  # untouched
    ext = again["external_tests"]["hospital-b"]
    assert ext["n"] == 300 and ext["source"] == "hospital-b/" and ext["metrics"]["n"] == 300
    page = report.read_text()
    assert "External test sets" in page and "hospital-b" in page
    assert "0123456789abcdef" in page and "x-external_tests" not in page
    _, replaced = record_external_test(tmp_path, "hospital-b", _external(200))
    assert replaced and read_results(tmp_path)["external_tests"]["hospital-b"]["n"] == 200


def test_a_malformed_external_test_names_its_key_path():
    r = make_results()
    bad = _external()
    bad["metrics"]["confusion_matrix"] = [[1, 2], [3, 4]]
    r["external_tests"] = {"b": bad}
    with pytest.raises(ResultsSchemaError) as err:
        validate_results(r)
    assert err.value.key_path == "external_tests.b.metrics.confusion_matrix"
    bad = _external()
    bad["n"] = 5
    r["external_tests"] = {"b": bad}
    with pytest.raises(ResultsSchemaError, match="external_tests.b.metrics.n"):
        validate_results(r)


def test_an_external_test_of_an_older_run_is_shown_at_its_own_positive_class():
    from report_samples import make_legacy_results

    r = make_legacy_results()  # /1: its own metrics read "the second class is positive"
    ext = _external()
    ext["metrics"]["positive_class"] = "normal"  # evaluated now, at a named positive class
    r["external_tests"] = {"b": ext}
    page = render_report(r)
    section = page[page.index('id="external-tests"'):]
    section = section[:section.index("</section>")]
    assert "Sensitivity: recall of normal" in section and "argmax" not in section
    assert "recall of opacity" in page[:page.index('id="external-tests"')]
