"""Every privacy spend per dataset, and each dataset's budget, in one SQLite file.

Writes run in ``BEGIN IMMEDIATE`` so two processes cannot both take the last of
a budget. Spends are charged by composing their DP-SGD histories with the
budget's accountant, never by adding epsilons. Only ids and numbers are stored.
A spend is reserved before training (or refused), updated as steps are taken,
then committed with what was released, or released if it took no step.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from privmed.errors import BudgetExceededError, ConfigError, DataError
from privmed.privacy.accounting import (
    History,
    compute_epsilon,
    history_covers,
    history_from_json,
    history_to_json,
    history_union,
    merge_history,
)

SCHEMA_VERSION = 1
_DATASET_ID = re.compile(r"[0-9a-f]{16}")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NOTE_MAX = 200
# A budget check compares floats computed the same way; this only absorbs rounding.
_SLACK = 1e-9

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    dataset_id TEXT PRIMARY KEY,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL CHECK (accountant IN ('prv', 'rdp')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    note TEXT
);
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'released')),
    planned_history TEXT NOT NULL,  -- JSON [{noise_multiplier, sample_rate, steps}]
    history TEXT NOT NULL,          -- what has actually been released so far
    delta REAL,                     -- the run's own delta, used when no budget is set
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    note TEXT,
    UNIQUE (dataset_id, run_id)
);
CREATE INDEX IF NOT EXISTS spends_by_run ON spends (run_id);
"""


@dataclass(frozen=True)
class Reservation:
    """One run's spend on one dataset, as stored."""

    dataset_id: str
    run_id: str
    status: str
    planned_history: History
    history: History
    delta: float | None
    created_at: str
    updated_at: str
    note: str | None = None
    #: True when :meth:`BudgetLedger.reserve` found this run's earlier reservation.
    resumed: bool = False

    @property
    def charged_history(self) -> History:
        """What the ledger counts against the budget for this spend."""
        if self.status == "committed":
            return list(self.history)
        if self.status == "reserved":
            return history_union(self.planned_history, self.history)
        return []


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fmt(eps: float) -> str:
    if math.isinf(eps):
        return "infinite"
    return f"{eps:.2f}" if eps >= 0.1 or eps == 0 else f"{eps:.2g}"


def _check_dataset_id(dataset_id: str) -> str:
    if not (isinstance(dataset_id, str) and _DATASET_ID.fullmatch(dataset_id)):
        raise ConfigError(f"A dataset id is 16 lowercase hex characters, got {dataset_id!r}.")
    return dataset_id


def _check_run(run_id: str) -> None:
    if not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
        raise ConfigError(f"A run id is 1-128 letters, digits or '._:-', got {run_id!r}.")


def _check_note(note: str | None) -> None:
    if note is not None and (not isinstance(note, str) or len(note) > _NOTE_MAX):
        raise ConfigError(f"A ledger note must be text of at most {_NOTE_MAX} characters.")


def _number(value: object) -> float:
    """``float(value)`` for real numbers (bools excluded), NaN for anything else."""
    try:
        return math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _to_json(history: Iterable[Sequence[float]]) -> str:
    return json.dumps(history_to_json(merge_history(history)))


class BudgetLedger:
    """Privacy budgets and spends per dataset id, kept in the SQLite file ``path``."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"Cannot create the folder for the privacy ledger {self.path}: "
                            f"{exc.strerror or exc}.") from None
        if self.path.is_dir():
            raise DataError(f"The privacy ledger path {self.path} is a folder, not a file.")
        self._init_schema()

    # ------------------------------------------------------------ plumbing

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A fresh connection (nothing shared across processes) in one transaction,
        IMMEDIATE when writing, with SQLite errors turned into DataError."""
        conn = None
        try:
            # isolation_level=None: we issue BEGIN ourselves; timeout: wait for other writers.
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise DataError(f"The privacy ledger {self.path} stayed locked by another "
                                f"process for {self.timeout:g} s; try again.") from None
            raise self._unreadable(exc) from None
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        finally:
            if conn is not None:
                conn.close()

    def _unreadable(self, exc: Exception) -> DataError:
        return DataError(f"The privacy ledger {self.path} is not a readable privmed ledger "
                         f"(SQLite: {exc}).")

    def _init_schema(self) -> None:
        try:
            # WAL lets readers proceed while a run writes (setting it needs no transaction).
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            finally:
                conn.close()
        except sqlite3.OperationalError:
            pass  # unsupported here (or busy): rollback journalling is still safe
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from None
        with self._connect(write=True) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DataError(f"The privacy ledger {self.path} was written by a newer privmed "
                                f"(schema {version}); upgrade privmed to use it.")
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%'")}
            if version == 0 and tables - {"budgets", "spends"}:
                raise DataError(f"{self.path} is an SQLite database but not a privmed ledger.")
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise DataError(f"The privacy ledger {self.path} is damaged (integrity check "
                                "failed).")
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _reservation(row: sqlite3.Row, resumed: bool = False) -> Reservation:
        return Reservation(
            dataset_id=row["dataset_id"], run_id=row["run_id"], status=row["status"],
            planned_history=history_from_json(json.loads(row["planned_history"])),
            history=history_from_json(json.loads(row["history"])), delta=row["delta"],
            created_at=row["created_at"], updated_at=row["updated_at"], note=row["note"],
            resumed=resumed)

    def _spends(self, conn: sqlite3.Connection, dataset_id: str) -> list[Reservation]:
        rows = conn.execute("SELECT * FROM spends WHERE dataset_id = ? ORDER BY id",
                            (dataset_id,))
        return [self._reservation(r) for r in rows]

    @staticmethod
    def _budget_row(conn: sqlite3.Connection, dataset_id: str) -> dict | None:
        row = conn.execute("SELECT * FROM budgets WHERE dataset_id = ?", (dataset_id,)
                           ).fetchone()
        return dict(row) if row else None

    @staticmethod
    def _epsilon(spends: Iterable[Reservation], budget: dict | None,
                 extra: Sequence[tuple[float, float, int]] = ()) -> float:
        """Epsilon of the composition of the charges of ``spends`` plus ``extra``."""
        spends = list(spends)
        history = [e for s in spends for e in s.charged_history] + list(extra)
        if not history:
            return 0.0
        if budget is not None:
            return compute_epsilon(history, budget["delta"], budget["accountant"])
        deltas = [s.delta for s in spends if s.delta is not None]
        if not deltas:
            return math.nan  # no budget and no delta recorded: epsilon is undefined
        return compute_epsilon(history, min(deltas), "prv")

    # ------------------------------------------------------------ budgets

    def set_budget(self, dataset_id: str, epsilon: float, delta: float,
                   accountant: str = "prv", note: str | None = None) -> None:
        """Create or change a dataset's budget (lowering it below what is spent is allowed:
        later spends are then refused)."""
        _check_dataset_id(dataset_id)
        _check_note(note)
        epsilon, delta = _number(epsilon), _number(delta)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"A budget epsilon must be a positive number, got {epsilon}.")
        if not 0 < delta < 1:
            raise ConfigError(f"A budget delta must lie strictly between 0 and 1, got {delta}.")
        if accountant not in ("prv", "rdp"):
            raise ConfigError(f"Unknown accountant '{accountant}': use 'prv' or 'rdp'.")
        now = _now()
        with self._connect(write=True) as conn:
            conn.execute(
                "INSERT INTO budgets (dataset_id, epsilon, delta, accountant, created_at, "
                "updated_at, note) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id) DO "
                "UPDATE SET epsilon = excluded.epsilon, delta = excluded.delta, "
                "accountant = excluded.accountant, updated_at = excluded.updated_at, "
                "note = COALESCE(excluded.note, budgets.note)",
                (dataset_id, epsilon, delta, accountant, now, now, note))

    def budget(self, dataset_id: str) -> dict | None:
        """``{dataset_id, epsilon, delta, accountant, created_at, updated_at, note}`` or None."""
        _check_dataset_id(dataset_id)
        with self._connect() as conn:
            return self._budget_row(conn, dataset_id)

    def spent(self, dataset_id: str) -> float:
        """Epsilon of all committed and reserved spends composed, at the budget's delta.

        Without a budget, at the smallest delta the runs recorded (NaN if none did).
        """
        _check_dataset_id(dataset_id)
        with self._connect() as conn:
            return self._epsilon(self._spends(conn, dataset_id),
                                 self._budget_row(conn, dataset_id))

    def remaining(self, dataset_id: str) -> float:
        """Budget epsilon minus :meth:`spent` (never below 0; infinite without a budget)."""
        _check_dataset_id(dataset_id)
        with self._connect() as conn:
            budget = self._budget_row(conn, dataset_id)
            spent = self._epsilon(self._spends(conn, dataset_id), budget) if budget else 0.0
        return max(0.0, budget["epsilon"] - spent) if budget else math.inf

    # ------------------------------------------------------------ spends

    def _refusal(self, dataset_id: str, budget: dict, spends: list[Reservation],
                 planned: History, verb: str) -> BudgetExceededError:
        # Budgets compose (the accountant's epsilon of all histories together), so the
        # sentence compares the composed total with the budget, not epsilons added.
        spent = self._epsilon(spends, budget)
        total = self._epsilon(spends, budget, planned)
        alone = compute_epsilon(planned, budget["delta"], budget["accountant"])
        return BudgetExceededError(
            f"{verb}: with this run, dataset {dataset_id} would reach epsilon "
            f"{_fmt(total)} composed, over its budget of {_fmt(budget['epsilon'])} "
            f"({_fmt(spent)} spent so far; this run alone: {_fmt(alone)}).")

    def check(self, dataset_id: str, planned_history: Iterable[Sequence[float]],
              verb: str = "Refused") -> None:
        """Raise the BudgetExceededError that :meth:`reserve` would for a new run of
        ``planned_history``; records nothing (a job checks all its sites up front)."""
        _check_dataset_id(dataset_id)
        planned = merge_history(planned_history)
        with self._connect() as conn:
            budget = self._budget_row(conn, dataset_id)
            spends = self._spends(conn, dataset_id)
        if budget is not None and (self._epsilon(spends, budget, planned)
                                   > budget["epsilon"] * (1 + _SLACK)):
            raise self._refusal(dataset_id, budget, spends, planned, verb)

    def reserve(self, dataset_id: str, run_id: str, planned_history: Iterable[Sequence[float]],
                delta: float | None = None, require_budget: bool = False,
                note: str | None = None) -> Reservation:
        """Charge a run's planned history to a dataset before it trains, or refuse.

        Raises BudgetExceededError when the composition of all spends with the plan
        would exceed the budget; nothing is recorded then. A run id that already holds
        a reservation on the dataset gets it back without a second charge (a resumed
        run), grown to the new plan if that is larger and still fits. ``delta`` is the
        run's own delta, used only to report spends on datasets without a budget.
        """
        _check_dataset_id(dataset_id)
        _check_run(run_id)
        _check_note(note)
        planned = merge_history(planned_history)
        if delta is not None:
            delta = _number(delta)
            if not 0 < delta < 1:
                raise ConfigError(f"Delta must lie strictly between 0 and 1, got {delta}.")
        with self._connect(write=True) as conn:
            budget = self._budget_row(conn, dataset_id)
            if budget is None and require_budget:
                raise ConfigError(f"No privacy budget is set for dataset {dataset_id}; "
                                  "set one before training on it.")
            spends = self._spends(conn, dataset_id)
            mine = next((s for s in spends if s.run_id == run_id), None)
            others = [s for s in spends if s.run_id != run_id]
            if mine is not None and mine.status != "released":
                if history_covers(mine.charged_history, planned):
                    return self._reservation(self._row(conn, dataset_id, run_id), resumed=True)
                if mine.status == "committed":
                    raise ConfigError(f"Run {run_id} is already committed on dataset "
                                      f"{dataset_id}; train further under a new run id.")
                planned = history_union(mine.charged_history, planned)
            if budget is not None:
                total = self._epsilon(others, budget, planned)
                if total > budget["epsilon"] * (1 + _SLACK):
                    raise self._refusal(dataset_id, budget, others, planned, "Refused")
            now = _now()
            if mine is None:
                conn.execute(
                    "INSERT INTO spends (dataset_id, run_id, status, planned_history, history, "
                    "delta, created_at, updated_at, note) VALUES (?, ?, 'reserved', ?, '[]', ?, "
                    "?, ?, ?)", (dataset_id, run_id, _to_json(planned), delta, now, now, note))
            else:
                conn.execute(
                    "UPDATE spends SET status = 'reserved', planned_history = ?, "
                    "delta = COALESCE(?, delta), updated_at = ?, note = COALESCE(?, note) "
                    "WHERE dataset_id = ? AND run_id = ?",
                    (_to_json(planned), delta, now, note, dataset_id, run_id))
            return self._reservation(self._row(conn, dataset_id, run_id),
                                     resumed=mine is not None)

    @staticmethod
    def _row(conn: sqlite3.Connection, dataset_id: str, run_id: str) -> sqlite3.Row:
        return conn.execute("SELECT * FROM spends WHERE dataset_id = ? AND run_id = ?",
                            (dataset_id, run_id)).fetchone()

    def _run_spends(self, conn: sqlite3.Connection, run_id: str,
                    dataset_id: str | None) -> list[Reservation]:
        _check_run(run_id)
        if dataset_id is None:
            rows = conn.execute("SELECT * FROM spends WHERE run_id = ? ORDER BY id", (run_id,))
        else:
            _check_dataset_id(dataset_id)
            rows = conn.execute("SELECT * FROM spends WHERE run_id = ? AND dataset_id = ?",
                                (run_id, dataset_id))
        found = [self._reservation(r) for r in rows]
        if not found:
            where = f" on dataset {dataset_id}" if dataset_id else ""
            raise ConfigError(f"Run {run_id} holds no reservation{where}; reserve first.")
        return found

    def _set(self, conn: sqlite3.Connection, spend: Reservation, status: str,
             history: History, planned: History | None = None) -> None:
        conn.execute(
            "UPDATE spends SET status = ?, history = ?, planned_history = ?, updated_at = ? "
            "WHERE dataset_id = ? AND run_id = ?",
            (status, _to_json(history), _to_json(planned or spend.planned_history), _now(),
             spend.dataset_id, spend.run_id))

    def update(self, run_id: str, actual_history: Iterable[Sequence[float]],
               dataset_id: str | None = None) -> None:
        """Record a reserved run's progress (the whole history so far, e.g. after an epoch).

        Progress beyond the plan is recorded, since it has happened, and the plan grows
        to cover it; if the dataset is then over budget, BudgetExceededError tells the
        run to stop.
        """
        actual = merge_history(actual_history)
        overspent: list[BudgetExceededError] = []
        with self._connect(write=True) as conn:
            for spend in self._run_spends(conn, run_id, dataset_id):
                if spend.status != "reserved":
                    raise ConfigError(f"Run {run_id} is already {spend.status} on dataset "
                                      f"{spend.dataset_id}; its spend can no longer change.")
                grows = not history_covers(spend.planned_history, actual)
                planned = history_union(spend.planned_history, actual)
                self._set(conn, spend, "reserved", actual, planned)
                budget = self._budget_row(conn, spend.dataset_id)
                if grows and budget is not None:
                    spends = self._spends(conn, spend.dataset_id)
                    if self._epsilon(spends, budget) > budget["epsilon"] * (1 + _SLACK):
                        others = [s for s in spends if s.run_id != run_id]
                        overspent.append(self._refusal(spend.dataset_id, budget, others,
                                                       planned, "Stop"))
        if overspent:  # raised after the commit: the steps were taken and stay recorded
            raise overspent[0]

    def commit(self, run_id: str, actual_history: Iterable[Sequence[float]],
               dataset_id: str | None = None) -> None:
        """Finalise a run with what it actually released (may be less than planned).

        Committed spends are permanent: committing again may add steps, never remove them.
        """
        actual = merge_history(actual_history)
        with self._connect(write=True) as conn:
            for spend in self._run_spends(conn, run_id, dataset_id):
                if spend.status == "committed" and not history_covers(actual, spend.history):
                    raise ConfigError(f"Run {run_id} is already committed on dataset "
                                      f"{spend.dataset_id} with more steps; committed "
                                      "spends cannot shrink.")
                self._set(conn, spend, "committed", actual)

    def release(self, run_id: str, dataset_id: str | None = None) -> None:
        """Give back the reservation of a run that took no step."""
        with self._connect(write=True) as conn:
            for spend in self._run_spends(conn, run_id, dataset_id):
                if spend.status == "committed":
                    raise ConfigError(f"Run {run_id} is committed on dataset "
                                      f"{spend.dataset_id}; committed spends are permanent.")
                if any(n for *_, n in spend.history):
                    raise ConfigError(f"Run {run_id} already took steps on dataset "
                                      f"{spend.dataset_id}; commit what it used instead.")
                self._set(conn, spend, "released", [])

    # ------------------------------------------------------------ reporting

    def entries(self, dataset_id: str | None = None) -> list[dict]:
        """Every spend, oldest first, with its histories as JSON lists and its own epsilon.

        ``epsilon`` is the spend's charge alone, for display; totals compose instead.
        """
        with self._connect() as conn:
            if dataset_id is None:
                rows = conn.execute("SELECT * FROM spends ORDER BY id").fetchall()
            else:
                rows = conn.execute("SELECT * FROM spends WHERE dataset_id = ? ORDER BY id",
                                    (_check_dataset_id(dataset_id),)).fetchall()
            budgets = {ds: self._budget_row(conn, ds) for ds in {r["dataset_id"] for r in rows}}
        out = []
        for row in rows:
            spend = self._reservation(row)
            budget = budgets[spend.dataset_id]
            out.append({
                "id": row["id"], "dataset_id": spend.dataset_id, "run_id": spend.run_id,
                "status": spend.status,
                "planned_history": history_to_json(spend.planned_history),
                "history": history_to_json(spend.history),
                "steps": sum(n for *_, n in spend.charged_history),
                "epsilon": self._epsilon([spend], budget),
                "delta": budget["delta"] if budget else spend.delta,
                "created_at": spend.created_at, "updated_at": spend.updated_at,
                "note": spend.note})
        return out

    def summary(self) -> list[dict]:
        """Per dataset: budget epsilon/delta/accountant (None without one), spent,
        remaining, and counts of runs (reserved + committed), reserved and committed."""
        with self._connect() as conn:
            ids = sorted({r[0] for r in conn.execute(
                "SELECT dataset_id FROM budgets UNION SELECT dataset_id FROM spends")})
            out = []
            for ds in ids:
                budget = self._budget_row(conn, ds)
                spends = self._spends(conn, ds)
                spent = self._epsilon(spends, budget)
                counts = {k: sum(s.status == k for s in spends)
                          for k in ("reserved", "committed")}
                out.append({
                    "dataset_id": ds,
                    "epsilon": budget["epsilon"] if budget else None,
                    "delta": budget["delta"] if budget else None,
                    "accountant": budget["accountant"] if budget else None,
                    "spent": spent,
                    "remaining": max(0.0, budget["epsilon"] - spent) if budget else math.inf,
                    "runs": counts["reserved"] + counts["committed"], **counts})
        return out
