"""Quasi-identifier types and their generalisation hierarchies.

Each quasi-identifier (QI) column gets an ordinal code per row (what Mondrian
splits on) and a rule to generalise a group of rows to one released value:

=============  =====================================  ==================================
kind           released value of a group              information loss (NCP)
=============  =====================================  ==================================
numeric        ``34`` or ``[30-39]``                  (hi - lo) / (column max - min)
date           ``1980-03-02``, ``1980-03`` (a         released span in days / column
               month), ``1980`` (a year) or           span in days (month and year
               ``[1979-11-02, 1981-05-07]``           spans count whole)
postcode       ``02139`` or ``021**`` (longest        distinct column values under the
               common prefix, padded with ``*``)      prefix / distinct values
categorical    ``F``, ``{F,M}`` or ``*`` (all)        distinct values in the set /
                                                      distinct values (0 for one value)
=============  =====================================  ==================================

NCP is the normalised certainty penalty of Xu et al., "Utility-based anonymization
using local recoding" (KDD 2006). Categorical values are ordered alphabetically (no
domain hierarchy is assumed); in a set, ``\\``, ``,``, ``{`` and ``}`` are escaped with
a backslash, and a single value that reads as ``*`` or starts with ``{`` or ``\\`` is
prefixed with ``\\``. Dates are coarsened to their month or year only where that at
most doubles the released span (see :func:`date_label`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd

from privmed.errors import ConfigError, DataError
from privmed.tabular.table import date_values, numeric_values, parse_day, require_columns

KINDS = ("numeric", "date", "postcode", "categorical")
_POSTCODE_NAMES = ("zip", "postcode", "postal", "plz")
_EPOCH = date(1970, 1, 1)
_NUM = r"-?\d+(?:\.\d+)?"
_RANGE = re.compile(rf"^\[({_NUM})-({_NUM})\]$")
_DATE_RANGE = re.compile(r"^\[(\d{4}-\d{2}-\d{2}), (\d{4}-\d{2}-\d{2})\]$")


@dataclass(frozen=True)
class QuasiIdentifier:
    """A QI column and its kind (one of :data:`KINDS`; None: infer it from the data)."""

    name: str
    kind: str | None = None


def parse_quasi(text: str) -> list[QuasiIdentifier]:
    """``"age:numeric,birth_date:date,sex"`` -> QIs (a kind left out is inferred)."""
    out: list[QuasiIdentifier] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        # The kind follows the last ':', so a column name may hold ':' itself when its kind
        # is given ("time:zone:categorical"); with a single ':' the tail is taken as a kind
        # (a misspelt one is refused below rather than read as part of the name).
        head, sep, tail = (s.strip() for s in part.rpartition(":"))
        if sep and (tail in KINDS or part.count(":") == 1):
            name, kind = head, tail
        else:
            name, kind = part, ""
        if not name:
            raise ConfigError(f"A quasi-identifier needs a column name, got '{part}'.")
        if kind and kind not in KINDS:
            raise ConfigError(f"Unknown quasi-identifier kind '{kind}' for column '{name}': "
                              f"use one of {', '.join(KINDS)}.")
        out.append(QuasiIdentifier(name, kind or None))
    if not out:
        raise ConfigError("Name at least one quasi-identifier, e.g. --quasi age:numeric,sex.")
    names = [q.name for q in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"Quasi-identifier '{dup}' is named twice.")
    return out


def infer_kind(series: pd.Series, name: str) -> str:
    """postcode by column name, else date if every cell is YYYY-MM-DD, else numeric if every
    cell is a number, else categorical."""
    if any(word in name.lower() for word in _POSTCODE_NAMES):
        return "postcode"
    text = series.astype(str)
    if not any(np.isnat(parse_day(v)) for v in pd.unique(text)):
        return "date"
    if np.isfinite(pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)).all():
        return "numeric"
    return "categorical"


def _fmt_num(x: float, integral: bool) -> str:
    if integral:
        return str(int(round(x)))
    # The shortest text that reads back as exactly x: a range always holds its values.
    return np.format_float_positional(float(x), unique=True, trim="-")


def _day(d: int) -> date:
    return _EPOCH + timedelta(days=int(d))


def _days(d: date) -> int:
    return (d - _EPOCH).days


def _escape(value: str) -> str:
    return re.sub(r"([\\,{}])", r"\\\1", value)


def _single(value: str) -> str:
    return "\\" + value if value == "*" or value.startswith(("{", "\\")) else value


def _split_set(body: str) -> list[str]:
    items, cur, esc = [], [], False
    for ch in body:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return items


def _group_min_max(codes: np.ndarray, labels: np.ndarray, groups: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.Series(codes).groupby(labels).agg(["min", "max"])
    frame = frame.reindex(range(groups))
    return frame["min"].to_numpy(), frame["max"].to_numpy()


class Generaliser:
    """One QI column: ordinal codes for partitioning, and group -> released value + NCP."""

    kind = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.codes = np.zeros(0)

    def generalise(self, labels: np.ndarray, groups: int) -> tuple[list[str], np.ndarray]:
        """Released value and NCP of each group ``0 .. groups - 1`` of ``labels``."""
        raise NotImplementedError


class NumericGeneraliser(Generaliser):
    kind = "numeric"

    def __init__(self, name: str, values: np.ndarray) -> None:
        super().__init__(name)
        self.codes = values.astype(np.float64)
        self.integral = bool(np.all(self.codes == np.round(self.codes)))
        self.span = float(self.codes.max() - self.codes.min())

    def generalise(self, labels: np.ndarray, groups: int) -> tuple[list[str], np.ndarray]:
        lo, hi = _group_min_max(self.codes, labels, groups)
        out = [_fmt_num(a, self.integral) if a == b else
               f"[{_fmt_num(a, self.integral)}-{_fmt_num(b, self.integral)}]"
               for a, b in zip(lo, hi, strict=True)]
        ncp = (hi - lo) / self.span if self.span > 0 else np.zeros(groups)
        return out, ncp


class DateGeneraliser(Generaliser):
    kind = "date"

    def __init__(self, name: str, values: np.ndarray) -> None:
        super().__init__(name)
        self.codes = to_codes(values, "date")
        self.span = float(self.codes.max() - self.codes.min())

    def generalise(self, labels: np.ndarray, groups: int) -> tuple[list[str], np.ndarray]:
        lo, hi = _group_min_max(self.codes, labels, groups)
        out: list[str] = []
        widths = np.zeros(groups)
        for g, (a, b) in enumerate(zip(lo, hi, strict=True)):
            text, (first, last) = date_label(_day(a), _day(b))
            out.append(text)
            widths[g] = _days(last) - _days(first)
        ncp = np.minimum(widths / self.span, 1.0) if self.span > 0 else np.zeros(groups)
        return out, ncp


def _month(year: int, month: int) -> tuple[date, date]:
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    return date(year, month, 1), nxt - timedelta(1)


def date_label(a: date, b: date) -> tuple[str, tuple[date, date]]:
    """Release form of the dates ``a <= b``, with the first and last day it stands for.

    The day itself; else its calendar month, or else its calendar year, when the dates
    lie in it and cover at least half of it (so coarsening at most doubles the span);
    else the range ``[a, b]``.
    """
    if a == b:
        return a.isoformat(), (a, b)
    days = (b - a).days + 1
    if (a.year, a.month) == (b.year, b.month):
        first, last = _month(a.year, a.month)
        if 2 * days >= (last - first).days + 1:
            return f"{a.year:04d}-{a.month:02d}", (first, last)
    if a.year == b.year:
        first, last = date(a.year, 1, 1), date(a.year, 12, 31)
        if 2 * days >= (last - first).days + 1:
            return f"{a.year:04d}", (first, last)
    return f"[{a.isoformat()}, {b.isoformat()}]", (a, b)


class PostcodeGeneraliser(Generaliser):
    kind = "postcode"

    def __init__(self, name: str, values: np.ndarray, source: str) -> None:
        super().__init__(name)
        text = values.astype(str)
        if (text == "").any():
            i = int(np.flatnonzero(text == "")[0])
            raise DataError(f"Column '{name}' of {source} has an empty postcode in row {i + 1}.")
        if np.char.find(text, "*").max() >= 0:
            i = int(np.flatnonzero(np.char.find(text, "*") >= 0)[0])
            raise DataError(f"Column '{name}' of {source} has a '*' in row {i + 1}; postcodes "
                            "are generalised with '*' and cannot contain it.")
        self.domain, inverse = np.unique(text, return_inverse=True)
        self.codes = inverse.astype(np.float64)
        self.lengths = np.char.str_len(text).astype(np.float64)

    def generalise(self, labels: np.ndarray, groups: int) -> tuple[list[str], np.ndarray]:
        lo, hi = _group_min_max(self.codes, labels, groups)
        _, width = _group_min_max(self.lengths, labels, groups)
        out: list[str] = []
        ncp = np.zeros(groups)
        for g in range(groups):
            first, last = self.domain[int(lo[g])], self.domain[int(hi[g])]
            if first == last:
                out.append(str(first))
                continue
            n = 0
            while n < min(len(first), len(last)) and first[n] == last[n]:
                n += 1
            prefix = str(first[:n])
            out.append(prefix + "*" * (int(width[g]) - n))
            under = (np.searchsorted(self.domain, prefix + "\U0010ffff")
                     - np.searchsorted(self.domain, prefix))
            ncp[g] = under / len(self.domain)
        return out, ncp


class CategoricalGeneraliser(Generaliser):
    kind = "categorical"

    def __init__(self, name: str, values: np.ndarray) -> None:
        super().__init__(name)
        self.domain, inverse = np.unique(values.astype(str), return_inverse=True)
        self.codes = inverse.astype(np.float64)

    def generalise(self, labels: np.ndarray, groups: int) -> tuple[list[str], np.ndarray]:
        size = len(self.domain)
        pairs = np.unique(labels.astype(np.int64) * size + self.codes.astype(np.int64))
        group, code = pairs // size, pairs % size
        starts = np.searchsorted(group, np.arange(groups + 1))
        out: list[str] = []
        ncp = np.zeros(groups)
        for g in range(groups):
            members = [str(self.domain[c]) for c in code[starts[g]:starts[g + 1]]]
            if len(members) == 1:
                out.append(_single(members[0]))
            elif len(members) == size:
                out.append("*")
                ncp[g] = 1.0
            else:
                out.append("{" + ",".join(_escape(m) for m in members) + "}")
                ncp[g] = len(members) / size
        return out, ncp


def build_generalisers(df: pd.DataFrame, quasi: list[QuasiIdentifier],
                       source: str) -> list[Generaliser]:
    """One generaliser per QI, with the kinds inferred where not given."""
    require_columns(df, [q.name for q in quasi], source, "--quasi")
    out: list[Generaliser] = []
    for q in quasi:
        kind = q.kind or infer_kind(df[q.name], q.name)
        if kind == "numeric":
            out.append(NumericGeneraliser(q.name, numeric_values(df, q.name, source)))
        elif kind == "date":
            out.append(DateGeneraliser(q.name, date_values(df, q.name, source)))
        elif kind == "postcode":
            out.append(PostcodeGeneraliser(q.name, df[q.name].to_numpy(), source))
        elif kind == "categorical":
            out.append(CategoricalGeneraliser(q.name, df[q.name].to_numpy()))
        else:
            raise ConfigError(f"Unknown quasi-identifier kind '{kind}' for column '{q.name}': "
                              f"use one of {', '.join(KINDS)}.")
    return out


# ------------------------------------------------------------------ reading a release

@dataclass(frozen=True)
class Released:
    """A parsed released value: what original values it is compatible with.

    numeric / date: the closed interval ``[lo, hi]`` (dates as days since 1970-01-01);
    postcode: ``prefix`` and the released ``width``; categorical: ``values`` (None: all).
    """

    kind: str
    lo: float = -math.inf
    hi: float = math.inf
    prefix: str = ""
    width: int = 0
    values: frozenset[str] | None = None


def parse_released(text: str, kind: str) -> Released:
    """Parse one released cell of a QI of ``kind``; DataError if it is not a release form."""
    text = str(text).strip()
    try:
        if kind == "numeric":
            m = _RANGE.match(text)
            lo, hi = (float(m[1]), float(m[2])) if m else (float(text), float(text))
            return Released(kind, lo=lo, hi=hi)
        if kind == "date":
            m = _DATE_RANGE.match(text)
            if m:
                a, b = date.fromisoformat(m[1]), date.fromisoformat(m[2])
            elif re.fullmatch(r"\d{4}", text):
                a, b = date(int(text), 1, 1), date(int(text), 12, 31)
            elif re.fullmatch(r"\d{4}-\d{2}", text):
                a, b = _month(int(text[:4]), int(text[5:]))
            else:
                a = b = date.fromisoformat(text)
            return Released(kind, lo=_days(a), hi=_days(b))
        if kind == "postcode":
            return Released(kind, prefix=text.rstrip("*"), width=len(text))
        if kind == "categorical":
            if text == "*":
                return Released(kind, values=None)
            if text.startswith("{") and text.endswith("}"):
                return Released(kind, values=frozenset(_split_set(text[1:-1])))
            return Released(kind, values=frozenset([text[1:] if text.startswith("\\")
                                                    else text]))
    except (ValueError, TypeError):
        pass
    raise DataError(f"'{text[:40]}' is not a released {kind} value.")


def covers(released: Released, values: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``values`` (numbers, days, or strings) ``released`` covers."""
    if released.kind in ("numeric", "date"):
        v = np.asarray(values, dtype=np.float64)
        return (v >= released.lo) & (v <= released.hi)
    text = np.asarray(values).astype(str)
    if released.kind == "postcode":
        return (np.char.startswith(text, released.prefix)
                & (np.char.str_len(text) <= released.width))
    if released.values is None:
        return np.ones(text.shape, dtype=bool)
    return np.isin(text, list(released.values))


def to_codes(values: np.ndarray | pd.Series, kind: str) -> np.ndarray:
    """Original values in the form :func:`covers` compares (dates -> days since 1970)."""
    if kind == "date":
        return np.asarray(values, dtype="datetime64[D]").astype(np.int64).astype(np.float64)
    if kind == "numeric":
        return np.asarray(values, dtype=np.float64)
    return np.asarray(values).astype(str)
