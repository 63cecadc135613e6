"""The report's metrics: positive class, operating point, intervals, multi-class figures,
and results written before them (schema /1) still read and rendered (issue 15)."""

from __future__ import annotations

import re

import pytest
from report_samples import make_legacy_results, make_results

from privmed.report import ResultsSchemaError, read_results, render_report, write_results
from privmed.report.plots import multiclass_roc_figure, roc_figure

DATA_URI = re.compile(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"')


def _metrics_section(page: str) -> str:
    return re.search(r'<section id="metrics">(.*?)</section>', page, re.S).group(1)


def test_binary_report_names_the_positive_class_threshold_and_intervals():
    page = render_report(make_results("binary"))
    section = _metrics_section(page)
    assert "Positive class (the finding): <strong>opacity</strong>" in section
    assert "Sensitivity: recall of opacity" in section
    assert "Specificity: recall of normal" in section
    assert "0.841 <small>(0.775–0.891)</small>" in section  # sensitivity with its Wilson CI
    assert "0.4123" in section or "0.412" in section
    assert "Youden" in section and "val split (300 images)" in section
    assert "not a probability" in section
    assert "outside the DP guarantee" in section and "docs/privacy.md" in section
    assert "its sensitivity and specificity are optimistic" in section
    assert "ROC curve of the positive class" in page and "operating point" in page


def test_multiclass_report_has_per_class_figures_and_named_averages():
    section = _metrics_section(render_report(make_results("multiclass")))
    assert "Sensitivity" not in section and "Specificity" not in section
    for words in ("Recall, macro", "Recall, weighted", "Precision, macro",
                  "ROC-AUC one-vs-rest, macro", "Quadratic weighted kappa", "0.735",
                  "ordered grades, in the order listed (normal &lt; opacity &lt; effusion)",
                  "test: per class", "ROC-AUC one-vs-rest (95% CI)"):
        assert words in section, words
    per_class = re.search(r"<caption>test: per class</caption>(.*?)</table>", section).group(1)
    assert per_class.count("<tr>") == 4  # header + three classes


def test_results_of_schema_1_still_load_and_say_what_they_meant(tmp_path):
    for kind in ("binary", "multiclass"):
        old = make_legacy_results(kind)
        write_results(tmp_path / kind, old)
        assert read_results(tmp_path / kind)["schema"] == "privmed.results/1"
        section = _metrics_section(render_report(old))
        if kind == "binary":
            assert "Positive class: <strong>opacity</strong> (the second class" in section
            assert "privmed.results/1" in section and "argmax" in section
        else:
            assert "Macro recall" in section and "Macro specificity" in section
            assert "0.817" in section


@pytest.mark.parametrize("mutate,path", [
    (lambda r: r["metrics"]["test"].__setitem__("sensitivity_ci", [0.9, 0.8]),
     "metrics.test.sensitivity_ci"),
    (lambda r: r["metrics"]["test"].__setitem__("positive_class", "pneumonia"),
     "metrics.test.positive_class"),
    (lambda r: r["metrics"]["test"].__setitem__("threshold", 1.5), "metrics.test.threshold"),
    (lambda r: r["operating_point"].__setitem__("positive_class", "x"),
     "operating_point.positive_class"),
    (lambda r: r["operating_point"].pop("within_dp_guarantee"),
     "operating_point.within_dp_guarantee"),
])
def test_validator_checks_the_new_binary_fields(mutate, path):
    results = make_results("binary")
    mutate(results)
    with pytest.raises(ResultsSchemaError) as info:
        write_results("/nonexistent", results)
    assert info.value.key_path == path


def test_validator_checks_the_multiclass_fields():
    results = make_results("multiclass")
    results["metrics"]["test"]["per_class"][0]["class"] = "mystery"
    with pytest.raises(ResultsSchemaError, match=r"per_class\[0\]\.class"):
        write_results("/nonexistent", results)
    results = make_results("multiclass")
    results["metrics"]["test"]["quadratic_weighted_kappa"] = 1.2
    with pytest.raises(ResultsSchemaError, match="quadratic_weighted_kappa"):
        write_results("/nonexistent", results)


def test_roc_plots_mark_the_operating_point_and_draw_one_vs_rest_curves():
    binary = make_results("binary")["metrics"]
    marked = roc_figure(binary)
    unmarked = roc_figure({k: {**m, "threshold": None} for k, m in binary.items()})
    assert marked.startswith(b"\x89PNG") and marked != unmarked
    multi = make_results("multiclass")["metrics"]
    assert multiclass_roc_figure(multi).startswith(b"\x89PNG")
    assert multiclass_roc_figure(binary) is None and roc_figure(multi) is None
