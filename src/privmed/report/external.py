"""External test sets: ``privmed evaluate`` results kept in the run's ``results.json``.

``results["external_tests"][NAME]`` holds where the images came from, how many, their
content hash, when they were evaluated and the same metrics object as
``metrics.<split>``; the run's own ``metrics`` are never touched. The report shows each
one under "External test sets".
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from privmed.report.results import SCHEMA_VERSION, _field, _join, _Violation

KEY = "external_tests"


def external_test_entry(*, source: str, how: str, n: int, dataset_id: str,
                        metrics: dict[str, Any], training_images: bool = False
                        ) -> dict[str, Any]:
    """One ``external_tests`` entry (docs/results-schema.md)."""
    return {"source": source, "images": how, "n": n, "dataset_id": dataset_id,
            "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "training_images": training_images, "metrics": metrics}


def record_external_test(run_dir: str | os.PathLike[str], name: str, entry: dict[str, Any]
                         ) -> tuple[Path, bool]:
    """Add (or replace) ``name`` in the run's ``external_tests`` and re-render its report.

    Returns the report's path and whether an entry of that name was replaced."""
    from privmed.report import read_results, write_report, write_results

    results = read_results(run_dir)
    tests = dict(results.get(KEY) or {})
    replaced = name in tests
    tests[name] = entry
    results[KEY] = tests
    write_results(Path(run_dir), results)
    return write_report(run_dir), replaced


def check_external_tests(d: dict, classes: list[str]) -> None:
    """Validate ``external_tests`` (optional) with the run's own metrics checks."""
    from privmed.report.metrics_schema import check_metrics

    tests = _field(d, KEY, "", "dict", required=False)
    for name, entry in (tests or {}).items():
        p = _join(KEY, name)
        if not isinstance(entry, dict):
            raise _Violation(p, "must be an object")
        for key in ("source", "images", "dataset_id", "evaluated"):
            _field(entry, key, p, "str")
        n = _field(entry, "n", p, "int", lo=1)
        _field(entry, "training_images", p, "bool", required=False)
        metrics = _field(entry, "metrics", p, "dict")
        try:
            check_metrics({"metrics": {"m": metrics}}, classes)
        except _Violation as v:  # name the real key path
            raise _Violation(v.path.replace("metrics.m", f"{p}.metrics", 1), v.problem
                             ) from None
        if metrics.get("n") != n:
            raise _Violation(f"{p}.metrics.n", f"must equal {p}.n ({n})")


def external_tests_section(r: dict) -> str:
    """The report's "External test sets" section ('' when there are none)."""
    from privmed.report import metrics_html
    from privmed.report.html import _e, _fmt, _kv, _section

    tests: dict = r.get(KEY) or {}
    if not tests:
        return ""
    parts = ["<p>Data sets evaluated after training with <code>privmed evaluate</code>, at "
             "the model's own positive class and threshold; the run's own splits are under "
             "Metrics above.</p>"]
    two = len(r["data"]["classes"]) == 2
    if any("positive_class" in t["metrics"] for t in tests.values()):
        # Evaluated by this privmed at a named positive class: never render them with the
        # legacy (/1) reading "the second class is positive" of an older run's own metrics.
        r = {**r, "schema": SCHEMA_VERSION}
    # The model's positive class and threshold, said once for all of them.
    said = (metrics_html._operating_point({**r, "metrics": {k: t["metrics"] for k, t in
                                                            tests.items()}}) if two else "")
    parts.append(said)
    for name, t in tests.items():
        rows = [("Source", f"<code>{_e(t['source'])}</code> ({_e(t['images'])})"),
                ("Images", _fmt(t["n"])),
                ("Dataset id", f"<code>{_e(t['dataset_id'])}</code>"),
                ("Evaluated", _e(t["evaluated"]))]
        warn = ('<p class="warn">These include the model\'s training images: the figures '
                "are not a test.</p>" if t.get("training_images") else "")
        sub = {**r, "metrics": {name: t["metrics"]}}
        table = (metrics_html._binary(sub) if two else metrics_html._multiclass(sub))
        if said and table.startswith(said):
            table = table[len(said):]
        table = table.replace("<tr><th>Split</th>", "<tr><th>Test set</th>", 1)
        parts.append(f"<h3>{_e(name)}</h3>{warn}{_kv(rows)}{table}"
                     f"{metrics_html._confusion(sub)}")
    return _section("External test sets", "".join(parts), "external-tests")
