"""report.html and its plots."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import matplotlib
import pytest
from report_samples import make_results

from privmed.errors import DataError
from privmed.report import (
    REPORT_FILENAME,
    RESULTS_FILENAME,
    render_report,
    write_report,
    write_results,
)
from privmed.report.plots import epsilon_figure, roc_figure, training_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class _TagCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)


def _parse(page: str) -> _TagCounter:
    parser = _TagCounter()
    parser.feed(page)
    parser.close()
    return parser


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m, validate=True) for m in DATA_URI.findall(page)]


def _report(tmp_path, results) -> str:
    write_results(tmp_path, results)
    path = write_report(tmp_path)
    assert path == tmp_path / REPORT_FILENAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_FILENAME, RESULTS_FILENAME]
    return path.read_text(encoding="utf-8")


def test_private_binary_report(tmp_path):
    page = _report(tmp_path, make_results("binary"))
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64") == 3
    assert all(png.startswith(PNG_SIGNATURE) for png in _pngs(page))
    # Privacy box: epsilon, delta, accountant, noise, clipping, sample rate, steps, ledger.
    assert "ε = 2.98" in page and "δ = 1e-05" in page
    for text in ("prv", "1.1", "0.2", "Optimiser steps</th><td>25<", "5.02 remaining",
                 "/tmp/ledger.sqlite"):
        assert text in page, text
    assert "NO differential privacy" not in page
    # Metrics per split (3 decimals) and confusion matrix cells.
    for text in ("0.813", "0.901", "0.797", "0.888", "0.602", "0.841", "0.773",
                 '<td class="n">124</td>', '<td class="n">121</td>'):
        assert text in page, text
    assert "small-cnn" in page and "synthetic" in page and "2026-11-22T03:00:00Z" in page
    # Reproducibility: seed, command, environment versions, training config.
    assert "Seed</th><td>0: fixes the model&#x27;s initialisation" in page
    assert "privmed train --data synthetic --epsilon 3" in page
    assert make_results("binary")["environment"]["torch"] in page
    assert "batch_size" in page


def test_run_id_is_shown_under_reproducibility(tmp_path):
    results = make_results("binary")
    results["run_id"] = "abc123def456"
    page = _report(tmp_path, results)
    assert "Run id</th><td><code>abc123def456</code>" in page
    assert 'id="x-run_id"' not in page
    results["run_id"] = 42
    with pytest.raises(DataError, match="run_id must be a non-empty string"):
        render_report(results)


def test_report_is_self_contained(tmp_path):
    page = _report(tmp_path, make_results("binary"))
    parsed = _parse(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    urls = [v for k, v in parsed.attrs if k in ("src", "href") and v]
    assert urls and all(u.startswith("data:image/png;base64,") for u in urls)
    assert "http://" not in page and "https://" not in page
    assert "<style>" in page


def test_non_private_report_has_banner_and_no_epsilon_plot(tmp_path):
    page = _report(tmp_path, make_results("nodp"))
    assert "NO differential privacy" in page
    assert 'role="alert"' in page
    assert page.count("data:image/png;base64") == 2  # ROC + training, no epsilon plot
    assert "Privacy spent over training" not in page


def test_multiclass_report_has_one_vs_rest_roc_plot(tmp_path):
    page = _report(tmp_path, make_results("multiclass"))
    assert page.count("data:image/png;base64") == 3  # one-vs-rest ROC + training + epsilon
    assert "One-vs-rest ROC curves" in page and "operating point" not in page
    assert "effusion" in page and "0.887" in page


def test_strings_are_escaped(tmp_path):
    results = make_results("binary")
    results["data"]["classes"] = ["<script>alert(1)</script>", "a & b"]
    for holder in (results["operating_point"], *results["metrics"].values()):
        holder["positive_class"] = "a & b"
    results["data"]["source"] = '"><img src=x onerror=alert(2)>'
    results["training"]["config"]["note"] = "<b>bold</b>"
    page = _report(tmp_path, results)
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "onerror=alert(2)>" not in page
    assert "script" not in _parse(page).tags
    assert all(v is None or not v.startswith("x") for _, v in _parse(page).attrs)


def test_unknown_keys_and_extra_sections(tmp_path):
    results = make_results("binary")
    results["site_notes"] = {"attack": "loss-threshold <mia>", "auc": 0.5234,
                             "per_class": [{"class": "normal", "auc": 0.51},
                                           {"class": "opacity", "auc": 0.53}]}
    page = render_report(results, extra_sections=[("Federation <rounds>", "<p>3 rounds</p>")])
    assert '<section id="x-site_notes"><h2>Site notes</h2>' in page
    assert "loss-threshold &lt;mia&gt;" in page and "0.5234" in page and "0.53" in page
    assert "<h2>Federation &lt;rounds&gt;</h2><p>3 rounds</p>" in page


def test_render_accepts_nan_and_shows_a_dash():
    results = make_results("binary")
    results["metrics"]["test"]["roc_auc"] = float("nan")
    page = DATA_URI.sub("", render_report(results))  # base64 may contain "nan"
    assert "nan" not in page.lower()
    test_row = re.search(r"<tr><th scope=row>test</th>(.*?)</tr>", page).group(1)
    assert test_row.count('<td class="n">—</td>') == 1
    assert "0.797" in test_row


def test_report_errors(tmp_path):
    with pytest.raises(DataError, match="No results file"):
        write_report(tmp_path)
    (tmp_path / RESULTS_FILENAME).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        write_report(tmp_path)
    assert not (tmp_path / REPORT_FILENAME).exists()
    results = make_results("binary")
    del results["privacy"]["epsilon"]
    with pytest.raises(DataError, match=r"privacy\.epsilon"):
        render_report(results)


def test_plots_return_png_or_none_without_touching_pyplot():
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    binary, multiclass, nodp = (make_results(k) for k in ("binary", "multiclass", "nodp"))
    assert roc_figure(binary["metrics"]).startswith(PNG_SIGNATURE)
    assert roc_figure(multiclass["metrics"]) is None
    assert training_figure(binary["training"]["epochs"]).startswith(PNG_SIGNATURE)
    assert training_figure([]) is None
    assert epsilon_figure(binary["privacy"]).startswith(PNG_SIGNATURE)
    assert epsilon_figure(nodp["privacy"]) is None
    no_val = [dict(e, val_auc=None, val_accuracy=None) for e in nodp["training"]["epochs"]]
    assert training_figure(no_val).startswith(PNG_SIGNATURE)
    assert plt.get_fignums() == []
    assert matplotlib.get_backend() == backend
    # Same input, same bytes: reports of identical runs are identical.
    assert epsilon_figure(binary["privacy"]) == epsilon_figure(binary["privacy"])


def test_audit_section_puts_measured_next_to_claimed_epsilon():
    results = make_results("binary")
    attack = {"auc": 0.61, "tpr_at_fpr_0.001": 0.01, "tpr_at_fpr_0.01": 0.05,
              "fpr": [0.001, 0.01, 0.1, 1.0], "tpr": [0.01, 0.05, 0.2, 1.0],
              "epsilon": {"eps_lb": 4.2}}
    results["audit"] = {
        "membership": {"attack": "lira-online", "shadows": 8, "examples": 600, "lira": attack,
                       "loss": attack, "eps_lb": 4.2, "confidence": 0.95,
                       "claimed_epsilon": 3.0, "delta": 1e-5, "consistent": False},
        "one_run": {"canaries": 100, "guesses": 50, "correct": 40, "eps_lb": 1.3,
                    "claimed_epsilon": 3.0},
        "inversion": {"rows": [{"scenario": "plain <b>", "batch_size": 1, "psnr_mean": 33.6,
                                "ssim_mean": 0.97, "label_accuracy": 1.0}]}}
    page = render_report(results, inversion_grid=b"\x89PNG fake")
    section = page[page.index('id="audit"'):]
    assert "Claimed ε = 3.00 per image · measured ε ≥ 4.20 per image" in section
    assert "exceeds the claimed ε" in section  # inconsistent results are flagged
    assert "40 of 50 guesses" in section and "plain &lt;b&gt;" in section
    assert 'alt="membership ROC"' in section and 'alt="reconstructions"' in section
    assert page.index('id="audit"') < page.index('id="plots"')
