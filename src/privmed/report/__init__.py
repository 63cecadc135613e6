"""Run outputs: the versioned ``results.json`` and the self-contained ``report.html``.

Importing this package does not import matplotlib; the plots are built lazily
when a report is rendered.
"""

from privmed.report.html import REPORT_FILENAME, render_report, write_report
from privmed.report.results import (
    RESULTS_FILENAME,
    SCHEMA_VERSION,
    ResultsSchemaError,
    environment_info,
    read_results,
    results_path,
    validate_results,
    write_results,
)

__all__ = [
    "REPORT_FILENAME",
    "RESULTS_FILENAME",
    "SCHEMA_VERSION",
    "ResultsSchemaError",
    "environment_info",
    "read_results",
    "render_report",
    "results_path",
    "validate_results",
    "write_report",
    "write_results",
]
