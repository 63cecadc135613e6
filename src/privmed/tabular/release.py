"""Releasing a patient table, from a CSV file or a DataFrame, in one call each:
``privmed.anonymize_table`` (k-anonymity, l-diversity) and ``privmed.dp_table_stats``
(DP statistics charged to a ledger). What ``privmed anonymize`` and ``privmed dp-stats``
do after parsing: read, check the outputs before any work or spend, release, write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from privmed.errors import ConfigError
from privmed.tabular.dpstats import (
    HistogramQuery,
    MeanQuery,
    check_contributions,
    check_request,
    dp_stats,
    parse_mean,
)
from privmed.tabular.hierarchy import QuasiIdentifier, parse_quasi
from privmed.tabular.mondrian import Anonymized, anonymize
from privmed.tabular.table import (
    check_output,
    read_table,
    table_id,
    write_csv_atomic,
    write_json_atomic,
)

Table = str | Path | pd.DataFrame


def _inputs(table: Table) -> list[Path]:
    """The files an output must never replace."""
    return [] if isinstance(table, pd.DataFrame) else [Path(table)]


def _read(table: Table) -> tuple[pd.DataFrame, str]:
    """Text cells, as read_table gives them, and the name errors use."""
    if isinstance(table, pd.DataFrame):
        return table.astype(str), "the table"
    return read_table(table), str(table)


def _quasi(quasi: str | Sequence[str | QuasiIdentifier]) -> list[QuasiIdentifier]:
    if isinstance(quasi, str):
        return parse_quasi(quasi)
    return [q if isinstance(q, QuasiIdentifier) else parse_quasi(q)[0] for q in quasi]


def anonymize_table(table: Table, k: int, quasi: str | Sequence[str | QuasiIdentifier], *,
                    sensitive: str | None = None, l: int | None = None,  # noqa: E741
                    drop: Sequence[str] = (), keep: Sequence[str] = (),
                    out: str | Path | None = None,
                    report: str | Path | None = None) -> Anonymized:
    """A k-anonymous (and, with ``l``, l-diverse on ``sensitive``) release of a patient
    table by Mondrian, with the information lost measured.

    ``table``: a CSV file or a DataFrame. ``quasi``: the quasi-identifiers, as
    ``"age:numeric,birth_date:date,postcode,sex"`` or a list (kinds numeric, date,
    postcode, categorical; inferred when left out). Every other column must be
    ``sensitive`` (released as is), in ``drop`` (left out: names, MRNs) or in ``keep``
    (released as is, deliberately): nothing leaves unmentioned. ``out``: write the
    released CSV (a file table's default: ``TABLE.k<k>.csv`` beside it; a DataFrame's:
    nothing written); ``report``: the report as JSON. Returns the released ``table`` and
    its ``report`` (achieved k and l checked with pycanon, NCP, discernibility). ::

        released = privmed.anonymize_table("patients.csv", 5, "age,sex,postcode",
                                           sensitive="diagnosis", l=2, drop=["name"])
    """
    qis = _quasi(quasi)
    inputs = _inputs(table)
    if out is None and inputs:
        out = inputs[0].with_name(f"{inputs[0].stem}.k{k}.csv")
    if out is not None:
        out = check_output(out, inputs)
    if report is not None:
        check_output(report, [*inputs, *([out] if out is not None else [])])
    df, source = _read(table)
    result = anonymize(df, qis, k, sensitive=sensitive, l=l, drop=list(drop),
                       keep=list(keep), source=source)
    if out is not None:
        write_csv_atomic(result.table, out, protect=inputs)
    if report is not None:
        record = {"table": source, "released": str(out) if out else None, **result.report}
        write_json_atomic(record, report, protect=[*inputs, *([out] if out else [])])
    return result


def _histograms(histograms: Mapping[str, Sequence[str]]) -> list[HistogramQuery]:
    for column, cats in histograms.items():
        if isinstance(cats, str) or not cats:
            raise ConfigError(f"Give the public categories of histogram column '{column}' as "
                              "a list (they are not read from the data: that would not be "
                              "private).")
    from privmed.tabular.dpstats import parse_categories

    parsed = parse_categories([f"{c}={','.join(v)}" for c, v in histograms.items()])
    return [HistogramQuery(c, parsed[c]) for c in histograms]


def _means(means: Mapping[str, tuple[float, float]]) -> list[MeanQuery]:
    # through the CLI's parser: one place checks the bounds
    return [parse_mean(f"{c}:{lo!r}:{hi!r}") for c, (lo, hi) in means.items()]


def dp_table_stats(table: Table, *, count: bool = False,
                   histograms: Mapping[str, Sequence[str]] | Sequence[HistogramQuery] = (),
                   means: Mapping[str, tuple[float, float]] | Sequence[MeanQuery] = (),
                   epsilon: float = 1.0, delta: float = 1e-6,
                   patient_column: str | None = None, max_rows_per_patient: int = 1,
                   ledger: str | Path | None = None, dataset_id: str | None = None,
                   budget_epsilon: float | None = None,
                   out: str | Path | None = None) -> dict[str, Any]:
    """Counts, histograms and means of a patient table under (ε, δ)-DP (OpenDP's Gaussian
    mechanism), charged to a privacy ledger before any noisy value exists.

    ``histograms``: ``{column: [public categories]}`` (others are counted as "other");
    ``means``: ``{column: (lower, upper)}``, values clamped to these public bounds.
    ``epsilon``/``delta`` cover the whole release. With ``patient_column`` the patient
    is the unit of privacy (their first ``max_rows_per_patient`` rows are used), else
    the row. ``ledger``: the SQLite ledger training uses; the table's content hash (or
    ``dataset_id``) is charged and a release over budget is refused (BudgetExceededError);
    ``budget_epsilon`` gives the dataset its budget on first use. ``out``: write the
    release as JSON. Returns the release: ``statistics`` (noisy values and noise
    scales), ``achieved_epsilon``, ``ledger`` (what was charged, what is left). ::

        stats = privmed.dp_table_stats("patients.csv", count=True,
                                       means={"age": (0, 100)}, epsilon=1.0)
    """
    from privmed.training.run import open_ledger

    inputs = _inputs(table)
    protect = [*inputs, *([Path(ledger)] if ledger is not None else [])]
    if out is not None:  # before anything is charged
        check_output(out, protect)
    hists = _histograms(histograms) if isinstance(histograms, Mapping) else list(histograms)
    mean_queries = _means(means) if isinstance(means, Mapping) else list(means)
    check_request(count=count, histograms=hists, means=mean_queries, epsilon=epsilon,
                  delta=delta)
    check_contributions(max_rows_per_patient, patient_column)
    if ledger is None and (dataset_id is not None or budget_epsilon is not None):
        raise ConfigError("--dataset-id and --budget-epsilon need --ledger FILE.")
    book = None
    df, source = _read(table)
    if ledger is not None:
        dataset_id = dataset_id or table_id(df)
        book = open_ledger(ledger, dataset_id, budget_epsilon, delta)
    release = dp_stats(df, count=count, histograms=hists, means=mean_queries,
                       epsilon=epsilon, delta=delta, patient_column=patient_column,
                       max_rows_per_patient=max_rows_per_patient, ledger=book,
                       dataset_id=dataset_id, source=source)
    if out is not None:
        write_json_atomic({"table": source, **release}, out, protect=protect)
    return release
