"""Reading a patient table from CSV, typed column access, and atomic writes.

Every cell is read as text (nothing is guessed or silently turned into NaN); a
column becomes numbers or dates only when a command asks for it, and a value
that does not parse is a :class:`~privmed.errors.DataError` naming the column,
the value and its row (data rows count from 1, after the header).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privmed.errors import DataError
from privmed.report.results import atomic_write_text

#: Larger numbers make spans and sums overflow to infinity.
MAX_MAGNITUDE = 1e300
#: Bytes looked at to tell a text file from a binary one.
_SNIFF = 8192


def read_table(path: str | Path) -> pd.DataFrame:
    """The CSV file at ``path`` as a DataFrame of stripped strings (missing cells are "")."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Table {path} does not exist.")
    if not path.is_file():
        raise DataError(f"Table {path} is not a file.")
    try:
        head = path.read_bytes()[:_SNIFF]
    except OSError as exc:
        raise DataError(f"Cannot read table {path}: {exc.strerror or exc}.") from None
    if b"\x00" in head:
        raise DataError(f"Table {path} is not a CSV text file (it holds binary data).")
    _check_header(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False,
                         encoding="utf-8-sig", index_col=False)
    except UnicodeDecodeError:
        raise DataError(f"Table {path} is not UTF-8 text; save it as a UTF-8 CSV.") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"Table {path} is empty.") from None
    except pd.errors.ParserError as exc:
        detail = str(exc).strip().splitlines()[-1].split("C error: ")[-1].rstrip(".")
        raise DataError(f"Table {path} is not a well-formed CSV file ({detail}).") from None
    if df.empty:
        raise DataError(f"Table {path} has a header but no data rows.")
    df.columns = [str(c).strip() for c in df.columns]
    df = df.fillna("")  # rows with fewer fields than the header
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()
    return df.reset_index(drop=True)


def _check_header(path: Path) -> None:
    """Duplicate or empty column names would be renamed silently by pandas, and a row with
    more fields than the header would shift every column: refuse them."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            width = len(header or [])
            for row_number, row in enumerate(reader, start=1):
                if len(row) > width:
                    raise DataError(f"Table {path} has {len(row)} fields in data row "
                                    f"{row_number} but {width} columns in its header.")
    except UnicodeDecodeError:
        raise DataError(f"Table {path} is not UTF-8 text; save it as a UTF-8 CSV.") from None
    except csv.Error as exc:
        raise DataError(f"Table {path} is not a well-formed CSV file ({exc}).") from None
    if not header:
        raise DataError(f"Table {path} is empty.")
    names = [h.strip() for h in header]
    if any(not n for n in names):
        raise DataError(f"Table {path} has a column without a name in its header.")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"Table {path} has two columns named '{name}'.")
        seen.add(name)


def require_columns(df: pd.DataFrame, columns: Iterable[str], source: str | Path,
                    option: str = "") -> None:
    """DataError if any of ``columns`` is missing from ``df`` (``option`` names who asked)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        named = f" named by {option}" if option else ""
        listed = ", ".join(f"'{c}'" for c in missing)
        raise DataError(f"Table {source} has no column {listed}{named} (its columns: "
                        f"{', '.join(df.columns)}).")


def _row(i: int) -> int:
    return int(i) + 1


def _refuse_first_bad(text: pd.Series, bad: np.ndarray, column: str, source: str | Path,
                      what_bad: str, rule: str) -> None:
    """One sentence naming the first bad cell of ``column``, if there is one."""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        cell = text.iloc[i]
        what = "an empty value" if cell == "" else f"the {what_bad} '{cell[:40]}'"
        raise DataError(f"Column '{column}' of {source} has {what} in row {_row(i)}; {rule}.")


def numeric_values(df: pd.DataFrame, column: str, source: str | Path) -> np.ndarray:
    """Column ``column`` as finite float64; DataError on an empty or non-numeric cell."""
    require_columns(df, [column], source)
    text = df[column]
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    _refuse_first_bad(text, ~np.isfinite(values), column, source, "non-numeric value",
                      "it must hold a number in every row")
    _refuse_first_bad(text, np.abs(values) > MAX_MAGNITUDE, column, source, "huge value",
                      f"numbers beyond ±{MAX_MAGNITUDE:g} cannot be generalised or summed")
    return values


def date_values(df: pd.DataFrame, column: str, source: str | Path) -> np.ndarray:
    """Column ``column`` as ``datetime64[D]``; DataError on an empty or unparsable cell."""
    require_columns(df, [column], source)
    text = df[column]
    days = {value: parse_day(value) for value in pd.unique(text)}  # any year 1-9999
    parsed = np.array([days[value] for value in text], dtype="datetime64[D]")
    _refuse_first_bad(text, np.isnat(parsed), column, source, "unparsable date",
                      "dates must be written YYYY-MM-DD")
    return parsed


def parse_day(value: str) -> np.datetime64:
    """``YYYY-MM-DD`` (years 1-9999) as ``datetime64[D]``; NaT when it is not a date."""
    try:
        return np.datetime64(datetime.strptime(value, "%Y-%m-%d").date(), "D")
    except ValueError:
        return np.datetime64("NaT", "D")


def table_id(df: pd.DataFrame) -> str:
    """Content hash of a table (first 16 hex of the sha256 of its normalised CSV bytes).

    Normalised: as :func:`read_table` reads it (stripped text cells, UTF-8, "\\n" line
    ends, minimal quoting), so re-saving a file with another editor keeps its id.
    """
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return hashlib.sha256(buf.getvalue().encode("utf-8")).hexdigest()[:16]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(path: str | Path, protect: Iterable[str | Path] = ()) -> Path:
    """DataError if writing ``path`` would replace one of ``protect`` (inputs, the ledger,
    another output), is a folder, or lies where no folder can be made; call it before any
    work (and before any privacy is spent) so that the user hears it at once."""
    path = Path(path)
    for other in protect:
        if _same_file(Path(other), path):
            raise DataError(f"Refusing to overwrite {other} with {path}; choose another "
                            "output.")
    if path.is_dir():
        raise DataError(f"Output {path} is a folder; give a file name.")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise DataError(f"Cannot write {path}: {ancestor} is not a writable folder.")
    return path


def _atomic_write(path: Path, text: str, protect: Iterable[str | Path] = ()) -> Path:
    path = check_output(path, protect)
    atomic_write_text(path, text)
    return path


def write_csv_atomic(df: pd.DataFrame, path: str | Path,
                     protect: Iterable[str | Path] = ()) -> Path:
    """Write ``df`` as CSV through a temporary file and ``os.replace`` (never half a file);
    refuses to write over any path in ``protect`` (the input)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return _atomic_write(Path(path), buf.getvalue(), protect)


def write_json_atomic(data: Any, path: str | Path, protect: Iterable[str | Path] = ()) -> Path:
    """Write ``data`` as indented JSON, atomically (see :func:`write_csv_atomic`)."""
    text = json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n"
    return _atomic_write(Path(path), text, protect)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
