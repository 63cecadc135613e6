"""The report's Metrics section: positive class, operating point, 95 % CIs, per class.

Binary runs show every sensitivity and specificity next to the class they are about and
the threshold they were taken at, with Wilson intervals (DeLong for the AUC); multi-class
runs show per-class recall, precision and one-vs-rest AUC, their macro and weighted
averages named as such, and the quadratic weighted kappa. Files of schema
``privmed.results/1`` (before positive classes were stated) are shown with what they
meant: the second class positive, argmax decisions.
"""

from __future__ import annotations

from typing import Any

from privmed.report.html import _e, _fmt, _section

LEGACY = "privmed.results/1"
TD = '<td class="n">'  # a number cell
KAPPA_NOTE = ("Quadratic weighted kappa counts a miss by two grades as worse than a miss by "
              "one: it is meaningful when the classes are ordered grades, in the order listed "
              "({order}); ignore it for unordered classes.")
CAVEAT_VAL = ("The validation split chose the threshold, so its sensitivity and specificity "
              "are optimistic; the test split's are the ones to quote.")


def _ci(m: dict, key: str) -> str:
    """``0.812 (0.735–0.896)``; the interval is left out where it is not defined."""
    value, ci = m.get(key), m.get(f"{key}_ci")
    if value is None:
        return "—"
    if not ci:
        return _fmt(value)
    return f"{_fmt(value)} <small>({_fmt(ci[0])}–{_fmt(ci[1])})</small>"


def _split_name(split: str, r: dict) -> str:
    if split == "test" and isinstance(r.get("federation"), dict):
        return "held-out test (coordinator)"
    return split


def _confusion(r: dict) -> str:
    classes = r["data"]["classes"]
    cms = []
    for split, m in r["metrics"].items():
        top = "".join(f"<th>{_e(c)}</th>" for c in classes)
        body = "".join(
            f"<tr><th scope=row>{_e(c)}</th>"
            + "".join(f'<td class="n">{v}</td>' for v in row) + "</tr>"
            for c, row in zip(classes, m["confusion_matrix"], strict=True))
        at = (f" at threshold {_fmt(m['threshold'])}" if m.get("threshold") is not None
              else "")
        cms.append(f"<table><caption>{_e(_split_name(split, r))}: rows true, columns "
                   f"predicted{at}</caption><tr><th>true \\ pred</th>{top}</tr>{body}</table>")
    return f'<h3>Confusion matrices</h3><div class="cms">{"".join(cms)}</div>'


def _operating_point(r: dict) -> str:
    """Who is positive, at which score, chosen how, and what that costs in privacy."""
    op: dict[str, Any] = r.get("operating_point") or {}
    m = next((m for m in r["metrics"].values() if m.get("positive_class")), None)
    if r["schema"] == LEGACY:
        return (f"<p class=op>Positive class: <strong>{_e(r['data']['classes'][1])}</strong> "
                f"(the second class; this run was recorded as {LEGACY}, before privmed chose "
                "the positive class by name). Decisions are the class with the larger score "
                "(threshold 0.5).</p>")
    if m is None:
        return ""
    name, threshold = m["positive_class"], m.get("threshold")
    parts = [f"Positive class (the finding): <strong>{_e(name)}</strong>."]
    if m.get("positive_class_assumed"):
        parts.append('<span class="warn">The class names do not say which class is the '
                     "finding; the second class was assumed.</span>")
    rule = (f"An image is called <strong>{_e(name)}</strong> when the model's score for it "
            f"(its softmax output: an uncalibrated score, not a probability) is at least "
            f"<strong>{_fmt(threshold)}</strong>")
    method = op.get("method")
    if method == "youden":
        how = "maximises Youden's J (sensitivity + specificity − 1)"
    elif method in ("sensitivity", "specificity"):
        how = f"reaches {method} ≥ {_fmt(op.get('target'), '.3g')}"
    elif method == "fixed":
        how = None
        rule += ", a value fixed by the user"
    else:
        how = None
        rule += ", the default (not tuned on any data)"
    if how and op.get("chosen_on"):
        rule += (f", the threshold that {how} on the {_e(op['chosen_on'])} split "
                 f"({_fmt(op.get('n'))} images)")
    parts.append(rule + ".")
    if op.get("note"):
        parts.append(f"Note: {_e(op['note'])}.")
    privacy = ""
    if op and not op.get("within_dp_guarantee", True):
        privacy = (f'<p class="op-privacy"><strong>Privacy:</strong> '
                   f"{_e(op.get('privacy_note') or '')} See docs/privacy.md.</p>")
    return f'<div class="op"><p>{" ".join(parts)}</p>{privacy}</div>'


def _binary(r: dict) -> str:
    legacy = r["schema"] == LEGACY
    classes = r["data"]["classes"]
    pos = classes[1] if legacy else next(
        (m["positive_class"] for m in r["metrics"].values() if m.get("positive_class")), None)
    neg = next((c for c in classes if c != pos), None) if pos else None
    sens, spec = ((f"Sensitivity: recall of {_e(pos)}", f"Specificity: recall of {_e(neg)}")
                  if pos else ("Sensitivity", "Specificity"))
    head = ("<tr><th>Split</th><th>n</th><th>ROC-AUC (95% CI)</th>"
            f"<th>{sens} (95% CI)</th><th>{spec} (95% CI)</th>"
            "<th>Accuracy (95% CI)</th><th>MCC</th><th>Positive class</th><th>Threshold</th>"
            "</tr>")
    rows = "".join(
        f"<tr><th scope=row>{_e(_split_name(split, r))}</th>{TD}{_fmt(m.get('n'))}</td>"
        f"{TD}{_ci(m, 'roc_auc')}</td>{TD}{_ci(m, 'sensitivity')}</td>"
        f"{TD}{_ci(m, 'specificity')}</td>{TD}{_ci(m, 'accuracy')}</td>"
        f"{TD}{_fmt(m.get('mcc'))}</td>"
        f"<td>{_e(m.get('positive_class') or pos or '—')}</td>"
        f"{TD}{_fmt(m.get('threshold')) if not legacy else 'argmax'}</td></tr>"
        for split, m in r["metrics"].items())
    notes = ["Sensitivity is the recall of the positive class, specificity that of the other; "
             "intervals: Wilson for proportions, DeLong for the AUC (a dash where one is "
             "undefined)."]
    op = r.get("operating_point") or {}
    if op.get("chosen_on") in r["metrics"]:
        notes.append(CAVEAT_VAL.replace("validation", _e(op["chosen_on"]), 1))
    return (_operating_point(r) + f"<table>{head}{rows}</table>"
            + "".join(f'<p class="sub">{n}</p>' for n in notes))


def _multiclass(r: dict) -> str:
    metrics, classes = r["metrics"], r["data"]["classes"]
    if not any("per_class" in m for m in metrics.values()):  # recorded before /2
        head = ("<tr><th>Split</th><th>n</th><th>Accuracy</th><th>Macro ROC-AUC "
                "(one-vs-rest)</th><th>MCC</th><th>Macro recall</th><th>Macro specificity"
                "</th></tr>")
        rows = "".join(
            f"<tr><th scope=row>{_e(s)}</th>{TD}{_fmt(m.get('n'))}</td>"
            + "".join(f"{TD}{_fmt(m.get(k))}</td>" for k in
                      ("accuracy", "roc_auc", "mcc", "sensitivity", "specificity"))
            + "</tr>" for s, m in metrics.items())
        return f"<table>{head}{rows}</table>"
    head = ("<tr><th>Split</th><th>n</th><th>Accuracy (95% CI)</th><th>ROC-AUC one-vs-rest, "
            "macro</th><th>ROC-AUC one-vs-rest, weighted</th><th>Recall, macro</th>"
            "<th>Recall, weighted</th><th>Precision, macro</th><th>Precision, weighted</th>"
            "<th>MCC</th><th>Quadratic weighted kappa</th></tr>")
    rows = []
    for split, m in metrics.items():
        mac, wei = m.get("macro") or {}, m.get("weighted") or {}
        cells = [_ci(m, "accuracy"), _fmt(mac.get("roc_auc")), _fmt(wei.get("roc_auc")),
                 _fmt(mac.get("recall")), _fmt(wei.get("recall")), _fmt(mac.get("precision")),
                 _fmt(wei.get("precision")), _fmt(m.get("mcc")),
                 _fmt(m.get("quadratic_weighted_kappa"))]
        rows.append(f"<tr><th scope=row>{_e(_split_name(split, r))}</th>"
                    f"{TD}{_fmt(m.get('n'))}</td>"
                    + "".join(f"{TD}{c}</td>" for c in cells) + "</tr>")
    per_class = []
    for split, m in metrics.items():
        if "per_class" not in m:
            continue
        body = "".join(
            f"<tr><th scope=row>{_e(c['class'])}</th>{TD}{c['support']}</td>"
            f"{TD}{_ci(c, 'recall')}</td>{TD}{_ci(c, 'precision')}</td>"
            f"{TD}{_ci(c, 'roc_auc')}</td></tr>" for c in m["per_class"])
        per_class.append(
            f"<table><caption>{_e(_split_name(split, r))}: per class</caption><tr><th>Class"
            "</th><th>Images</th><th>Recall (95% CI)</th><th>Precision (95% CI)</th>"
            f"<th>ROC-AUC one-vs-rest (95% CI)</th></tr>{body}</table>")
    notes = ["Decisions are the class with the highest score. Macro: the plain mean over "
             "classes; weighted: weighted by each class's images (weighted recall equals "
             "accuracy). Intervals: Wilson for proportions, DeLong for the AUC (a dash "
             "where one is undefined).",
             KAPPA_NOTE.format(order=" &lt; ".join(_e(c) for c in classes))]
    return (f"<table>{head}{''.join(rows)}</table>"
            + '<h3>Per class</h3><div class="cms">' + "".join(per_class) + "</div>"
            + "".join(f'<p class="sub">{n}</p>' for n in notes))


def metrics_section(r: dict) -> str:
    """The Metrics section of the report for a validated results dict."""
    if not r["metrics"]:
        return _section("Metrics", "<p>No evaluation was run.</p>", "metrics")
    body = _binary(r) if len(r["data"]["classes"]) == 2 else _multiclass(r)
    return _section("Metrics", body + _confusion(r), "metrics")
