"""Validation of ``metrics`` and ``operating_point`` in ``results.json``.

Kept apart from :mod:`privmed.report.results` (which calls it) so that each module holds
one concept. Every new key is optional, so results written before it still load.
"""

from __future__ import annotations

from privmed.report.results import _describe, _field, _items, _join, _Violation


def _ci(obj: dict, key: str, path: str) -> None:
    """An optional ``[low, high]`` interval in [0, 1] (or null)."""
    value = _field(obj, key, path, "list", null=True, required=False)
    if value is None:
        return
    if (len(value) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                   and 0 <= v <= 1 for v in value) or value[0] > value[1]):
        raise _Violation(_join(path, key), "must be [low, high] with 0 <= low <= high <= 1")


def _roc(roc: dict, rp: str) -> None:
    fpr, tpr = _field(roc, "fpr", rp, "list"), _field(roc, "tpr", rp, "list")
    for name, values in (("fpr", fpr), ("tpr", tpr)):
        if not all(isinstance(v, int | float) and not isinstance(v, bool)
                   and 0 <= v <= 1 for v in values):
            raise _Violation(f"{rp}.{name}", "must hold numbers between 0 and 1")
    if len(fpr) != len(tpr) or len(fpr) < 2:
        raise _Violation(rp, "must have fpr and tpr of the same length (at least 2)")


def _averages(m: dict, p: str) -> None:
    for how in ("macro", "weighted"):
        avg = _field(m, how, p, "dict", required=False)
        if avg is not None:
            for key in ("recall", "precision", "roc_auc"):
                _field(avg, key, _join(p, how), "num", null=True, required=False, lo=0, hi=1)


def check_metrics(d: dict, classes: list[str]) -> None:
    metrics = _field(d, "metrics", "", "dict")
    k = len(classes)
    for split, m in metrics.items():
        p = _join("metrics", split)
        if not isinstance(m, dict):
            raise _Violation(p, f"must be an object, got {_describe(m)}")
        n = _field(m, "n", p, "int", lo=0)
        for key in ("accuracy", "roc_auc", "sensitivity", "specificity"):
            _field(m, key, p, "num", null=True, lo=0, hi=1)
            _ci(m, f"{key}_ci", p)
        _field(m, "mcc", p, "num", null=True, lo=-1, hi=1)
        cm = _field(m, "confusion_matrix", p, "list")
        if len(cm) != k or not all(
                isinstance(row, list) and len(row) == k
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row)
                for row in cm):
            raise _Violation(f"{p}.confusion_matrix",
                             f"must be a {k} x {k} matrix of non-negative integers")
        if sum(map(sum, cm)) != n:
            raise _Violation(f"{p}.confusion_matrix", f"must count {n} images (the split's n)")
        positive = _field(m, "positive_class", p, "str", required=False)
        if positive is not None and positive not in classes:
            raise _Violation(f"{p}.positive_class", f"must be one of data.classes, got "
                                                    f"{positive!r}")
        _field(m, "threshold", p, "num", required=False, lo=0, hi=1)
        _field(m, "positive_class_assumed", p, "bool", required=False)
        roc = _field(m, "roc_curve", p, "dict", required=False)
        if roc is not None:
            _roc(roc, f"{p}.roc_curve")
        for cp, row in _items(m, "per_class", p, required=False):
            name = _field(row, "class", cp, "str")
            if name not in classes:
                raise _Violation(f"{cp}.class", f"must be one of data.classes, got {name!r}")
            _field(row, "support", cp, "int", lo=0)
            for key in ("recall", "precision", "roc_auc"):
                _field(row, key, cp, "num", null=True, required=False, lo=0, hi=1)
                _ci(row, f"{key}_ci", cp)
        _averages(m, p)
        _field(m, "quadratic_weighted_kappa", p, "num", null=True, required=False, lo=-1, hi=1)
        for cp, curve in _items(m, "roc_curves", p, required=False):
            _field(curve, "class", cp, "str")
            _roc(curve, cp)


def check_operating_point(d: dict, classes: list[str]) -> None:
    """The optional top-level ``operating_point`` of a binary run."""
    op = _field(d, "operating_point", "", "dict", required=False, null=True)
    if op is None:
        return
    name = _field(op, "positive_class", "operating_point", "str")
    if name not in classes:
        raise _Violation("operating_point.positive_class",
                         f"must be one of data.classes, got {name!r}")
    _field(op, "threshold", "operating_point", "num", lo=0, hi=1)
    _field(op, "method", "operating_point", "str")
    _field(op, "within_dp_guarantee", "operating_point", "bool")
    _field(op, "chosen_on", "operating_point", "str", null=True, required=False)
    _field(op, "n", "operating_point", "int", null=True, required=False, lo=0)
    for key in ("target", "val_sensitivity", "val_specificity"):
        _field(op, key, "operating_point", "num", null=True, required=False, lo=0, hi=1)
