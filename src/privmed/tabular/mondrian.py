"""k-anonymity (and distinct l-diversity) by strict multidimensional Mondrian partitioning.

Hand-written because no maintained Mondrian on PyPI fits our pins (``anjana`` pins
numpy==2.0.2 and pycanon==1.3.5, whose typer==0.23.2 clashes with Flower's typer<0.21).

LeFevre, DeWitt and Ramakrishnan, "Mondrian multidimensional k-anonymity" (ICDE
2006): starting from the whole table, a partition is cut in two along the QI with
the widest normalised range, at the boundary between distinct values nearest its
median, as long as both halves keep at least ``k`` rows (and, with ``l``, at least
``l`` distinct sensitive values); a partition no QI can cut is released as one
equivalence class, each QI generalised by :mod:`privmed.tabular.hierarchy`. Cuts
are strict (no value is on both sides), so no row is suppressed: any table of at
least ``k`` rows (with at least ``l`` distinct sensitive values) can be released.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from privmed.errors import ConfigError
from privmed.tabular.hierarchy import QuasiIdentifier, build_generalisers
from privmed.tabular.report import release_report
from privmed.tabular.table import require_columns


def partition(codes: np.ndarray, k: int, sensitive: np.ndarray | None = None,
              l: int = 1) -> np.ndarray:  # noqa: E741  (l of l-diversity)
    """Mondrian partition of the rows of ``codes`` (rows x QIs, ordinal codes).

    Returns one partition label per row (0 .. P-1). Every partition has at least
    ``k`` rows and, when ``sensitive`` (integer codes per row) is given, at least
    ``l`` distinct sensitive codes; the caller checks the whole table meets both.
    """
    codes = np.asarray(codes, dtype=np.float64)
    n, dims = codes.shape
    span = codes.max(axis=0) - codes.min(axis=0) if n else np.zeros(dims)
    span[span == 0] = 1.0
    check_l = sensitive is not None and l > 1
    sens = np.asarray(sensitive, dtype=np.int64) if check_l else None
    nsens = int(sens.max()) + 1 if check_l and n else 1
    labels = np.zeros(n, dtype=np.int64)
    stack = [np.arange(n)]
    next_label = 0

    def diverse(rows: np.ndarray) -> bool:
        return np.count_nonzero(np.bincount(sens[rows], minlength=nsens)) >= l

    while stack:
        rows = stack.pop()
        cut = None
        if len(rows) >= 2 * k:
            sub = codes[rows]
            widths = (sub.max(axis=0) - sub.min(axis=0)) / span
            for dim in np.argsort(-widths, kind="stable"):
                if widths[dim] <= 0:
                    break
                cut = _cut(sub[:, dim], rows, k, diverse if check_l else None)
                if cut is not None:
                    break
        if cut is None:
            labels[rows] = next_label
            next_label += 1
        else:
            stack.extend(cut)
    return labels


def _cut(col: np.ndarray, rows: np.ndarray, k: int,
         diverse: Callable[[np.ndarray], bool] | None
         ) -> tuple[np.ndarray, np.ndarray] | None:
    """Split ``rows`` at the value boundary of ``col`` nearest the median with >= k rows on
    each side (both sides l-diverse when ``diverse`` is given), or None."""
    m = len(col)
    order = np.argsort(col, kind="stable")
    ordered = col[order]
    bounds = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1  # first index of a new value
    bounds = bounds[(bounds >= k) & (bounds <= m - k)]
    if bounds.size == 0:
        return None
    at = int(bounds[np.argmin(np.abs(bounds - m / 2))])
    left, right = rows[order[:at]], rows[order[at:]]
    if diverse is not None and not (diverse(left) and diverse(right)):
        return None
    return left, right


@dataclass
class Anonymized:
    """A released table and its report (see :func:`privmed.tabular.report.release_report`)."""

    table: pd.DataFrame
    report: dict
    #: Mondrian partition of every input row (the released row order differs).
    labels: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=int))


def _check_columns(df: pd.DataFrame, quasi: Sequence[QuasiIdentifier], sensitive: str | None,
                   drop: Sequence[str], keep: Sequence[str], source: str) -> None:
    qi = [q.name for q in quasi]
    roles = [("--quasi", qi), ("--sensitive", [sensitive] if sensitive else []),
             ("--drop", list(drop)), ("--keep", list(keep))]
    for option, cols in roles:
        require_columns(df, cols, source, option)
    seen: dict[str, str] = {}
    for option, cols in roles:
        for col in cols:
            if col in seen and seen[col] != option:
                raise ConfigError(f"Column '{col}' is named by both {seen[col]} and {option}.")
            seen[col] = option
    unnamed = [c for c in df.columns if c not in seen]
    if unnamed:
        listed = ", ".join(f"'{c}'" for c in unnamed)
        raise ConfigError(f"Column(s) {listed} of {source} are not named: drop direct "
                          "identifiers with --drop, or release a column deliberately with "
                          "--keep (or name it with --quasi or --sensitive).")


def anonymize(df: pd.DataFrame, quasi: Sequence[QuasiIdentifier], k: int, *,
              sensitive: str | None = None, l: int | None = None,  # noqa: E741
              drop: Sequence[str] = (), keep: Sequence[str] = (), source: str = "the table",
              check: bool = True) -> Anonymized:
    """k-anonymous (and l-diverse on ``sensitive``) release of ``df`` by Mondrian.

    Every column must have a role: a QI (generalised), ``sensitive`` (released as is),
    ``drop`` (left out: direct identifiers) or ``keep`` (released as is, deliberately);
    any other column is a ConfigError, so nothing leaves unmentioned. Rows are released
    sorted by their released values, so the order reveals nothing about the input's.
    ``check``: measure the achieved k and l with pycanon (slow on very large tables).
    """
    quasi = list(quasi)
    if not quasi:
        raise ConfigError("Name at least one quasi-identifier, e.g. --quasi age:numeric,sex.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k must be a whole number of at least 2, got {k}.")
    if l is not None and (isinstance(l, bool) or not isinstance(l, (int, np.integer)) or l < 1):
        raise ConfigError(f"l must be a whole number of at least 1, got {l}.")
    if l is not None and l > 1 and sensitive is None:
        raise ConfigError("l-diversity needs the sensitive column: give --sensitive COLUMN.")
    _check_columns(df, quasi, sensitive, drop, keep, source)
    n = len(df)
    if k > n:
        raise ConfigError(f"k = {k} is larger than the table's {n} rows, so no release can "
                          f"be {k}-anonymous.")
    sens_codes = None
    if sensitive is not None:
        distinct, sens_codes = np.unique(df[sensitive].to_numpy().astype(str),
                                         return_inverse=True)
        if l is not None and l > len(distinct):
            raise ConfigError(f"l = {l} is larger than the {len(distinct)} distinct values of "
                              f"the sensitive column '{sensitive}', so no release can be "
                              f"{l}-diverse.")
    generalisers = build_generalisers(df, quasi, source)
    codes = np.column_stack([g.codes for g in generalisers])
    labels = partition(codes, int(k), sens_codes, int(l or 1))
    groups = int(labels.max()) + 1
    released = df.drop(columns=list(drop)).copy()
    ncp: dict[str, float] = {}
    for g in generalisers:
        values, group_ncp = g.generalise(labels, groups)
        released[g.name] = np.asarray(values, dtype=object)[labels]
        ncp[g.name] = float(np.mean(group_ncp[labels]))
    released = released.sort_values(list(released.columns), kind="stable").reset_index(drop=True)
    report = release_report(
        released, [g.name for g in generalisers], sensitive, k=int(k), l=l, rows=n,
        partitions=groups, ncp=ncp, check=check)
    report.update({
        "quasi_identifiers": [{"name": g.name, "kind": g.kind} for g in generalisers],
        "sensitive": sensitive, "dropped": list(drop), "kept": list(keep)})
    return Anonymized(released, report, labels)
