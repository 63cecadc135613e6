"""Counts, histograms and means of a patient table under (epsilon, delta)-DP with OpenDP.

Unit of privacy: the *patient* when ``patient_column`` names each row's patient, else
the *row* (add/remove one row, as in DP-SGD with Poisson sampling). Per patient, the
contributions are bounded as OpenDP's privacy unit ``unit_of(contributions=k)`` has
it: at most ``max_rows_per_patient`` = k rows of each patient are kept (the first k in
table order: chosen without looking at any value), so one patient changes at most k
rows (symmetric distance k) and every stability map is evaluated at k.

Every statistic is a Gaussian mechanism built with OpenDP (a stability map gives its
L2 sensitivity Δ at the unit's k changed rows; ``then_gaussian`` adds noise of std σ).
A Gaussian mechanism with noise multiplier ``z = σ / Δ`` is exactly one DP-SGD history
entry ``(z, sample_rate=1.0, steps=1)``, so a release of ``m`` mechanisms, all with the
same ``z``, is the history ``[(z, 1.0, m)]``: calibrated with the project's accountant
(:func:`privmed.privacy.calibrate_noise_multiplier`, PRV by default) to meet the
requested (epsilon, delta), and charged to the same :class:`BudgetLedger`, composed
with training, as every other spend. OpenDP's own privacy map must agree: each
measurement's zCDP ρ at the unit's distance equals Δ²/(2σ²) = 1/(2z²); OpenDP's
(looser) zCDP -> (ε, δ) conversion of the whole release is reported next to the
accountant's.

* count: ``make_count`` (Δ = k), discrete Gaussian noise.
* histogram: ``make_count_by_categories`` over *public* categories declared by the
  user (never read from the data; rows outside them are counted in ``other``), L2
  Δ = k: OpenDP's safe bound, since a patient's k rows may all fall in one category
  (sqrt(k) would hold only for rows in distinct categories).
* mean over ``[lower, upper]`` (public bounds, never taken from the data): each value
  is centred on ``c = (lower + upper) / 2`` and written in units of ``h / 2**20`` (``h``
  half the width; rounding moves a value by at most ``h / 2**21``), then OpenDP clamps
  it to ``±2**20`` and sums 64-bit integers (Δ = k·h, exact, any size; OpenDP's float
  sum would charge Δ = 2kh for bounds of mixed sign). The mean is
  ``c + noisy sum / max(noisy count, 1)``, clamped to the bounds (post-processing);
  the noisy count is the release's count, so any number of means share one count.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from privmed.errors import ConfigError
from privmed.privacy.accounting import (
    calibrate_noise_multiplier,
    compute_epsilon,
    history_to_json,
)
from privmed.privacy.ledger import BudgetLedger
from privmed.tabular.table import numeric_values, require_columns, table_id

DEFAULT_EPSILON = 1.0
DEFAULT_DELTA = 1e-6
#: More public categories than this in one histogram is refused (noise on each).
MAX_CATEGORIES = 1000
#: A mean's values are summed as integers: this many units per half-width of the bounds.
SUM_UNITS = 2 ** 20
#: What a release without a patient column protects; the line the output gives it.
ROW_UNIT_NOTE = ("The guarantee is per row: a patient with r rows is covered only by group "
                 "privacy (about r times epsilon); give --patient-column to protect patients.")


@dataclass(frozen=True)
class HistogramQuery:
    column: str
    categories: tuple[str, ...]


@dataclass(frozen=True)
class MeanQuery:
    column: str
    lower: float
    upper: float


def parse_mean(text: str) -> MeanQuery:
    """``"age:0:120"`` -> MeanQuery (the column name may itself contain ':')."""
    parts = str(text).rsplit(":", 2)
    if len(parts) != 3 or not parts[0].strip():
        raise ConfigError(f"A mean is asked as COLUMN:LOWER:UPPER, got '{text}'.")
    try:
        lower, upper = float(parts[1]), float(parts[2])
    except ValueError:
        raise ConfigError(f"The bounds of --mean '{text}' must be numbers.") from None
    if not (math.isfinite(lower) and math.isfinite(upper)):
        raise ConfigError(f"The bounds of --mean '{text}' must be finite numbers.")
    if lower >= upper:
        raise ConfigError(f"The lower bound of --mean '{text}' must be below its upper bound.")
    if not math.isfinite(upper - lower):
        raise ConfigError(f"The bounds of --mean '{text}' are too far apart to compute with.")
    return MeanQuery(parts[0].strip(), lower, upper)


def parse_categories(texts: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["sex=F,M", "dx=a,b"]`` -> ``{"sex": ("F", "M"), "dx": ("a", "b")}``."""
    out: dict[str, tuple[str, ...]] = {}
    for text in texts:
        column, sep, body = str(text).partition("=")
        column = column.strip()
        cats = tuple(c.strip() for c in body.split(","))
        if not sep or not column or not body.strip() or any(not c for c in cats):
            raise ConfigError(f"Public categories are given as COLUMN=a,b,c, got '{text}'.")
        if column in out:
            raise ConfigError(f"The categories of column '{column}' are given twice.")
        if len(set(cats)) != len(cats):
            dup = next(c for c in cats if cats.count(c) > 1)
            raise ConfigError(f"Category '{dup}' of column '{column}' is listed twice.")
        if len(cats) > MAX_CATEGORIES:
            raise ConfigError(f"Column '{column}' has {len(cats)} categories; a histogram "
                              f"takes at most {MAX_CATEGORIES} (each gets its own noise).")
        out[column] = cats
    return out


def histogram_queries(columns: Sequence[str],
                      categories: dict[str, tuple[str, ...]]) -> list[HistogramQuery]:
    """Pair each ``--histogram`` column with its declared public categories."""
    unused = [c for c in categories if c not in columns]
    if unused:
        raise ConfigError(f"--categories names column '{unused[0]}' but no --histogram asks "
                          "for it.")
    if len(set(columns)) != len(columns):
        raise ConfigError("A histogram column is asked for twice.")
    out = []
    for column in columns:
        if column not in categories:
            raise ConfigError(f"Declare the public categories of histogram column '{column}' "
                              f"with --categories {column}=a,b,c (categories are not read "
                              "from the data: that would not be private).")
        out.append(HistogramQuery(column, categories[column]))
    return out


def check_request(*, count: bool, histograms: Sequence[HistogramQuery],
                  means: Sequence[MeanQuery], epsilon: float, delta: float
                  ) -> tuple[float, float]:
    """ConfigError for a release that asks for nothing, a mean twice, or an impossible
    (epsilon, delta); returns them as floats. Cheap: callers run it before any I/O."""
    if not (count or histograms or means):
        raise ConfigError("Ask for at least one statistic: --count, --histogram COLUMN or "
                          "--mean COLUMN:LOWER:UPPER.")
    if len({m.column for m in means}) != len(means):
        raise ConfigError("A mean column is asked for twice.")
    try:
        epsilon, delta = float(epsilon), float(delta)
    except (TypeError, ValueError):
        raise ConfigError("Epsilon and delta must be numbers.") from None
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"Epsilon must be a positive number, got {epsilon:g}.")
    if not 0 < delta < 1:
        raise ConfigError(f"Delta must lie strictly between 0 and 1, got {delta:g}.")
    return epsilon, delta


def _rows_bound(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--max-rows-per-patient must be a whole number of at least 1, "
                          f"got {k}.")
    return k


def check_contributions(max_rows_per_patient: int, patient_column: str | None) -> int:
    """ConfigError unless ``max_rows_per_patient`` is a whole number >= 1, and > 1 only
    with a patient column (rows cannot be bounded per patient without knowing whose they
    are); returns it. Cheap: callers run it before any I/O."""
    k = _rows_bound(max_rows_per_patient)
    if k > 1 and not patient_column:
        raise ConfigError("--max-rows-per-patient needs --patient-column: rows can only be "
                          "bounded per patient when the table says whose they are.")
    return k


@dataclass
class Mechanism:
    """One OpenDP Gaussian measurement of a release."""

    kind: str  # "count", "histogram" or "sum"
    column: str | None
    sensitivity: float  # OpenDP stability map at the unit's changed rows, in data units
    scale: float  # noise standard deviation, in the data's units
    rho: float  # OpenDP zCDP privacy map at the unit's changed rows
    measurement: Any = field(repr=False)
    query: Any = None


@dataclass
class StatsPlan:
    """The mechanisms of one release and its privacy, before any data is touched."""

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    mechanisms: list[Mechanism]
    #: Rows one protected unit may change (OpenDP's ``unit_of(contributions=k)``).
    contributions: int = 1

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(self.noise_multiplier, 1.0, len(self.mechanisms))]

    @property
    def achieved_epsilon(self) -> float:
        return compute_epsilon(self.history, self.delta, self.accountant)

    @property
    def rho(self) -> float:
        return sum(m.rho for m in self.mechanisms)

    def opendp_epsilon(self) -> float:
        """OpenDP's conversion of the release's total zCDP ρ to ε at ``delta``."""
        import opendp.prelude as dp

        dp.enable_features("contrib")
        gaussian = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False),
                                      dp.absolute_distance(T=float),
                                      scale=1.0 / math.sqrt(2.0 * self.rho))
        return float(dp.c.make_zCDP_to_approxDP(gaussian).map(1.0).epsilon(self.delta))


def plan_stats(*, count: bool = False, histograms: Sequence[HistogramQuery] = (),
               means: Sequence[MeanQuery] = (), epsilon: float = DEFAULT_EPSILON,
               delta: float = DEFAULT_DELTA, accountant: str = "prv",
               max_rows_per_patient: int = 1) -> StatsPlan:
    """Calibrate one noise multiplier for all mechanisms and build them with OpenDP.

    ``max_rows_per_patient`` (k) is the unit's contribution bound: every stability and
    privacy map is evaluated at OpenDP's ``unit_of(contributions=k)``, so each
    sensitivity, and with it the noise, is k times that of one row."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    epsilon, delta = check_request(count=count, histograms=histograms, means=means,
                                   epsilon=epsilon, delta=delta)
    metric, d_in = dp.unit_of(contributions=_rows_bound(max_rows_per_patient))
    specs: list[tuple[str, Any, Any]] = []
    rows = (dp.vector_domain(dp.atom_domain(T=int)), metric)
    if count or means:
        specs.append(("count", None, rows >> dp.t.then_count()))
    for h in histograms:
        space = (dp.vector_domain(dp.atom_domain(T=str)), metric)
        specs.append(("histogram", h, space >> dp.t.then_count_by_categories(
            categories=list(h.categories), MO="L2Distance<int>")))
    units = (dp.vector_domain(dp.atom_domain(T="i64")), metric)
    for m in means:
        specs.append(("sum", m, units >> dp.t.then_clamp(bounds=(-SUM_UNITS, SUM_UNITS))
                      >> dp.t.then_sum()))
    z = calibrate_noise_multiplier(epsilon, delta, 1.0, len(specs), accountant)
    mechanisms = []
    for kind, query, transformation in specs:
        sensitivity = float(transformation.map(d_in))
        measurement = transformation >> dp.m.then_gaussian(z * sensitivity)
        rho = float(measurement.map(d_in))
        if not math.isclose(rho, 1.0 / (2.0 * z * z), rel_tol=1e-9):
            raise RuntimeError(f"OpenDP charges rho {rho!r} for a Gaussian {kind} with noise "
                               f"multiplier {z!r}, not 1/(2 z^2); please report this bug.")
        unit = _unit(query) if kind == "sum" else 1.0
        mechanisms.append(Mechanism(kind, getattr(query, "column", None), sensitivity * unit,
                                    z * sensitivity * unit, rho, measurement, query))
    return StatsPlan(epsilon, delta, accountant, z, mechanisms, int(d_in))


def _unit(query: MeanQuery) -> float:
    """Value of one integer unit of a mean's sum."""
    return (query.upper - query.lower) / 2.0 / SUM_UNITS


def _inputs(df: pd.DataFrame, plan: StatsPlan, source: str) -> list[list]:
    """Each mechanism's input vector, validated (DataError) before any budget is charged."""
    out: list[list] = []
    for m in plan.mechanisms:
        if m.kind == "count":
            out.append([1] * len(df))
        elif m.kind == "histogram":
            out.append(df[m.column].astype(str).tolist())
        else:
            centre = (m.query.lower + m.query.upper) / 2.0
            # Pre-clipped only so that huge values cannot overflow int64; OpenDP clamps.
            x = np.clip((numeric_values(df, m.column, source) - centre) / _unit(m.query),
                        -SUM_UNITS, SUM_UNITS)
            out.append(np.rint(x).astype(np.int64).tolist())
    return out


def _results(plan: StatsPlan, raw: list) -> list[dict]:
    """JSON-ready values of the released mechanisms (the means are post-processing)."""
    out: list[dict] = []
    noisy_count = None
    for m, value in zip(plan.mechanisms, raw, strict=True):
        if m.kind == "count":
            noisy_count = int(value)
            out.append({"statistic": "count", "value": noisy_count, "noise_std": m.scale,
                        "sensitivity": m.sensitivity, "rho": m.rho})
        elif m.kind == "histogram":
            counts = [int(v) for v in value]
            out.append({"statistic": "histogram", "column": m.column,
                        "counts": dict(zip(m.query.categories, counts[:-1], strict=True)),
                        "other": counts[-1], "noise_std": m.scale,
                        "sensitivity": m.sensitivity, "rho": m.rho})
    for m, value in zip(plan.mechanisms, raw, strict=True):
        if m.kind != "sum":
            continue
        q: MeanQuery = m.query
        centre = (q.lower + q.upper) / 2.0
        total = float(value) * _unit(q)
        mean = centre + float(value) / max(noisy_count or 0, 1) * _unit(q)  # no overflow
        out.append({"statistic": "mean", "column": m.column, "lower": q.lower,
                    "upper": q.upper, "value": min(max(mean, q.lower), q.upper),
                    "noisy_centred_sum": total, "centre": centre, "noise_std": m.scale,
                    "sensitivity": m.sensitivity, "rho": m.rho})
    return out


def run_plan(plan: StatsPlan, df: pd.DataFrame, source: str = "the table") -> list[dict]:
    """Run every mechanism of ``plan`` on ``df`` (no ledger: the caller charges it)."""
    inputs = _inputs(df, plan, source)
    return _results(plan, [m.measurement(x) for m, x in zip(plan.mechanisms, inputs,
                                                              strict=True)])


def rows_per_patient(df: pd.DataFrame, patient_column: str, k: int = 1,
                     source: str = "the table") -> pd.DataFrame:
    """Each patient's first ``k`` rows in table order: one patient then changes at most
    ``k`` rows. Which rows are kept depends on their order only, never on a value (a
    choice by value, e.g. the largest, would itself leak)."""
    require_columns(df, [patient_column], source, "--patient-column")
    k = check_contributions(k, patient_column)
    return df.groupby(patient_column, sort=False, dropna=False).head(k).reset_index(drop=True)


def dp_stats(df: pd.DataFrame, *, count: bool = False,
             histograms: Sequence[HistogramQuery] = (), means: Sequence[MeanQuery] = (),
             epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
             patient_column: str | None = None, max_rows_per_patient: int = 1,
             ledger: BudgetLedger | None = None, dataset_id: str | None = None,
             run_id: str | None = None, source: str = "the table") -> dict:
    """One DP release of ``df``: plan, reserve on ``ledger`` (or refuse), compute, commit.

    With ``patient_column`` the unit is the patient: only each patient's first
    ``max_rows_per_patient`` rows are used and the noise covers that many; without it the
    unit is the row. ``dataset_id`` defaults to :func:`~privmed.tabular.table.table_id`
    of ``df`` as given. The accountant is the ledger budget's (PRV without one). Returns
    the release as a JSON-ready dict: unit, values, noise scales, epsilon / delta, and
    the ledger charge.
    """
    k = check_contributions(max_rows_per_patient, patient_column)
    for column in [h.column for h in histograms] + [m.column for m in means]:
        require_columns(df, [column], source)
    if ledger is not None:
        dataset_id = dataset_id or table_id(df)
    data = rows_per_patient(df, patient_column, k, source) if patient_column else df
    unit = "patient" if patient_column else "row"
    budget = ledger.budget(dataset_id) if ledger is not None and dataset_id else None
    accountant = budget["accountant"] if budget else "prv"
    plan = plan_stats(count=count, histograms=histograms, means=means, epsilon=epsilon,
                      delta=delta, accountant=accountant, max_rows_per_patient=k)
    inputs = _inputs(data, plan, source)
    run_id = run_id or f"dp-stats-{uuid.uuid4().hex[:12]}"
    if ledger is not None:  # refused here, before any noisy value exists
        # The ledger's own unit column knows patients and images only; the note says
        # what this spend protects.
        bound = f" (at most {k} rows each)" if patient_column else ""
        ledger.reserve(dataset_id, run_id, plan.history, delta=plan.delta,
                       note=f"dp-stats per {unit}{bound}: {len(plan.mechanisms)} Gaussian "
                       "mechanisms")
        try:
            raw = [m.measurement(x) for m, x in zip(plan.mechanisms, inputs, strict=True)]
        except BaseException:
            ledger.release(run_id, dataset_id)
            raise
        ledger.commit(run_id, plan.history, dataset_id)
    else:
        raw = [m.measurement(x) for m, x in zip(plan.mechanisms, inputs, strict=True)]
    return {
        "unit": unit,
        "unit_of_privacy": (f"one patient (at most {k} row{'s' if k > 1 else ''} per patient "
                            f"via {patient_column})" if patient_column else "one row"),
        # No exact row or patient counts here: what leaves must be the noisy values only.
        "max_rows_per_patient": k if patient_column else None,
        "note": None if patient_column else ROW_UNIT_NOTE,
        "epsilon": plan.epsilon, "delta": plan.delta, "accountant": plan.accountant,
        "achieved_epsilon": plan.achieved_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "history": history_to_json(plan.history),
        "opendp": {"rho": plan.rho, "epsilon": plan.opendp_epsilon()},
        "statistics": _results(plan, raw),
        "ledger": _ledger_record(ledger, dataset_id, run_id, unit) if ledger else None,
    }


def _ledger_record(ledger: BudgetLedger, dataset_id: str, run_id: str, unit: str) -> dict:
    budget = ledger.budget(dataset_id)
    entry = next(e for e in ledger.entries(dataset_id) if e["run_id"] == run_id)
    return {
        "path": str(ledger.path), "dataset_id": dataset_id, "run_id": run_id, "unit": unit,
        "charged_epsilon": entry["epsilon"], "charged_delta": entry["delta"],
        "budget_epsilon": budget["epsilon"] if budget else None,
        "spent_epsilon": ledger.spent(dataset_id),
        "remaining_epsilon": ledger.remaining(dataset_id) if budget else None,
    }

