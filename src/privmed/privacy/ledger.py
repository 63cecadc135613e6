"""Every privacy spend, and each dataset's budget, in one SQLite file.

Writes run in ``BEGIN IMMEDIATE`` so two processes cannot both take the last of
a budget. Spends are charged by composing their DP-SGD histories with the
budget's accountant, never by adding epsilons. Only ids, keyed hashes and numbers are
stored. A spend is reserved before training (or refused), updated as steps are taken,
then committed with what was released, or released if it took no step.

Spends are recorded per dataset id, but charged to the *records* the run touches when
it names them (``records=``, a :class:`~privmed.privacy.records.PrivacyRecords`): a
record's history is that of every spend on any dataset holding it, its budget the
strictest of those datasets', and a run costs what the most charged of its records has
left (``ledger_records``). A dataset whose records were registered once is accounted
per record from then on, also by calls that do not pass them; a dataset never
registered is accounted by its id alone, as in schema 1.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from privmed.errors import ConfigError
from privmed.privacy.accounting import (
    History,
    compute_epsilon,
    history_covers,
    history_to_json,
    history_union,
    merge_history,
)
from privmed.privacy.ledger_records import (
    RecordView,
    check_units,
    dataset_unit,
    load_request,
    record_view,
    register,
)
from privmed.privacy.ledger_store import (
    SCHEMA_VERSION,
    LedgerStore,
    Reservation,
    check_dataset_id,
    check_note,
    check_run,
    now,
    number,
    reservation,
    to_json,
)
from privmed.privacy.records import PrivacyRecords

__all__ = ["SCHEMA_VERSION", "BudgetLedger", "Reservation"]


class BudgetLedger(LedgerStore):
    """Privacy budgets and spends per dataset id, charged per record, kept in the SQLite
    file ``path``."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        super().__init__(path, timeout)
        #: run id -> datasets this handle reserved it on: ``update``, ``commit`` and
        #: ``release`` without a dataset id touch only those (one ledger file may hold
        #: the same run id for several sites' datasets).
        self._reserved: dict[str, set[str]] = {}

    # ------------------------------------------------------------ plumbing

    def _view(self, conn: sqlite3.Connection, dataset_id: str,
              records: PrivacyRecords | None, unit: str | None = None,
              exclude_run: str | None = None, register_records: bool = False) -> RecordView:
        """The records a call is about: ``records``, else those registered for the
        dataset, else the dataset id alone. ``unit`` defaults to the records' unit, else
        the dataset's."""
        per_record = load_request(conn, dataset_id, records)
        if records is not None:
            unit = records.unit
            if register_records:
                register(conn, dataset_id)
        elif unit is None:
            unit = dataset_unit(conn, dataset_id)
        return record_view(conn, dataset_id, unit, per_record, exclude_run)

    @staticmethod
    def _budget_row(conn: sqlite3.Connection, dataset_id: str) -> dict | None:
        row = conn.execute("SELECT * FROM budgets WHERE dataset_id = ?", (dataset_id,)
                           ).fetchone()
        return dict(row) if row else None

    @staticmethod
    def _row(conn: sqlite3.Connection, dataset_id: str, run_id: str) -> sqlite3.Row:
        return conn.execute("SELECT * FROM spends WHERE dataset_id = ? AND run_id = ?",
                            (dataset_id, run_id)).fetchone()

    @staticmethod
    def _epsilon(spend: Reservation, budget: dict | None) -> float:
        """One spend's charge alone, at its dataset's budget delta (else its own)."""
        history = spend.charged_history
        if not history:
            return 0.0
        if budget is not None:
            return compute_epsilon(history, budget["delta"], budget["accountant"])
        return math.nan if spend.delta is None else compute_epsilon(history, spend.delta, "prv")

    # ------------------------------------------------------------ budgets

    def set_budget(self, dataset_id: str, epsilon: float, delta: float,
                   accountant: str = "prv", note: str | None = None, *,
                   records: PrivacyRecords | None = None) -> None:
        """Create or change a dataset's budget (lowering it below what is spent is allowed:
        later spends are then refused). ``records``: register the records the dataset
        holds, so that the budget binds them in whatever dataset they arrive later."""
        check_dataset_id(dataset_id)
        check_note(note)
        epsilon, delta = number(epsilon), number(delta)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"A budget epsilon must be a positive number, got {epsilon}.")
        if not 0 < delta < 1:
            raise ConfigError(f"A budget delta must lie strictly between 0 and 1, got {delta}.")
        if accountant not in ("prv", "rdp"):
            raise ConfigError(f"Unknown accountant '{accountant}': use 'prv' or 'rdp'.")
        stamp = now()
        with self._connect(write=True) as conn:
            if records is not None:
                load_request(conn, dataset_id, records)
                register(conn, dataset_id)
            conn.execute(
                "INSERT INTO budgets (dataset_id, epsilon, delta, accountant, created_at, "
                "updated_at, note) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id) DO "
                "UPDATE SET epsilon = excluded.epsilon, delta = excluded.delta, "
                "accountant = excluded.accountant, updated_at = excluded.updated_at, "
                "note = COALESCE(excluded.note, budgets.note)",
                (dataset_id, epsilon, delta, accountant, stamp, stamp, note))

    def budget(self, dataset_id: str) -> dict | None:
        """``{dataset_id, epsilon, delta, accountant, created_at, updated_at, note}`` or None."""
        check_dataset_id(dataset_id)
        with self._connect() as conn:
            return self._budget_row(conn, dataset_id)

    def spent(self, dataset_id: str, *, records: PrivacyRecords | None = None) -> float:
        """Epsilon of the most charged record (of ``records``, else of those registered
        for the dataset): all committed and reserved spends on datasets holding it,
        composed at its budget's delta. A dataset without registered records: all spends
        on it composed, at its budget's delta.

        Without a budget, at the smallest delta the runs recorded (NaN if none did).
        """
        check_dataset_id(dataset_id)
        with self._connect() as conn:
            return self._view(conn, dataset_id, records).spent()

    def remaining(self, dataset_id: str, *, records: PrivacyRecords | None = None) -> float:
        """What the most charged record has left: the least budget epsilon minus spent
        over the records (never below 0; infinite when no budget applies)."""
        check_dataset_id(dataset_id)
        with self._connect() as conn:
            return self._view(conn, dataset_id, records).remaining()

    def record_groups(self, dataset_id: str, *, records: PrivacyRecords | None = None
                      ) -> list[dict]:
        """The records (``records``, else those registered) grouped by the datasets
        holding them: ``{datasets, records, epsilon, budget_epsilon}`` per group, most
        charged first (``records`` is None for a dataset without registered records)."""
        check_dataset_id(dataset_id)
        with self._connect() as conn:
            view = self._view(conn, dataset_id, records)
        out = [{"datasets": list(g.datasets), "records": g.records, "epsilon": g.epsilon(),
                "budget_epsilon": g.budget["epsilon"] if g.budget else None,
                "unit": view.unit} for g in view.groups]
        return sorted(out, key=lambda g: (math.isnan(g["epsilon"]),
                                          0.0 if math.isnan(g["epsilon"]) else -g["epsilon"]))

    # ------------------------------------------------------------ spends

    def check(self, dataset_id: str, planned_history: Iterable[Sequence[float]],
              verb: str = "Refused", *, records: PrivacyRecords | None = None) -> None:
        """Raise the BudgetExceededError (or mixed-unit ConfigError) that :meth:`reserve`
        would for a new run of ``planned_history``; charges nothing (a job checks all its
        sites up front). ``records`` are registered when the run fits."""
        check_dataset_id(dataset_id)
        planned = merge_history(planned_history)
        with self._connect(write=records is not None) as conn:
            view = self._view(conn, dataset_id, records, "image", register_records=True)
            check_units(conn, dataset_id, view.unit)
            if view.exceeding(planned):
                raise view.refusal(planned, verb)

    def reserve(self, dataset_id: str, run_id: str, planned_history: Iterable[Sequence[float]],
                delta: float | None = None, require_budget: bool = False,
                note: str | None = None, *,
                records: PrivacyRecords | None = None) -> Reservation:
        """Charge a run's planned history to a dataset before it trains, or refuse.

        Raises BudgetExceededError when, for any record the run touches (``records``,
        else those registered for the dataset, else the dataset id alone), the
        composition of its spends with the plan would exceed its budget; ConfigError when
        the run's images were charged in the other privacy unit; nothing is recorded
        then. A run id that already holds a reservation on the dataset gets it back
        without a second charge (a resumed run), grown to the new plan if that is larger
        and still fits. ``delta`` is the run's own delta, used only to report spends on
        datasets without a budget. A run without ``records`` is charged per image.
        """
        check_dataset_id(dataset_id)
        check_run(run_id)
        check_note(note)
        planned = merge_history(planned_history)
        if delta is not None:
            delta = number(delta)
            if not 0 < delta < 1:
                raise ConfigError(f"Delta must lie strictly between 0 and 1, got {delta}.")
        with self._connect(write=True) as conn:
            budget = self._budget_row(conn, dataset_id)
            view = self._view(conn, dataset_id, records, "image", exclude_run=run_id,
                              register_records=True)
            if require_budget and budget is None and not all(g.budget for g in view.groups):
                raise ConfigError(f"No privacy budget is set for dataset {dataset_id}; "
                                  "set one before training on it.")
            check_units(conn, dataset_id, view.unit)
            row = self._row(conn, dataset_id, run_id)
            mine = reservation(row) if row is not None else None
            if mine is not None and mine.status != "released":
                if history_covers(mine.charged_history, planned):
                    self._reserved.setdefault(run_id, set()).add(dataset_id)
                    return reservation(row, resumed=True)
                if mine.status == "committed":
                    raise ConfigError(f"Run {run_id} is already committed on dataset "
                                      f"{dataset_id}; train further under a new run id.")
                planned = history_union(mine.charged_history, planned)
            if view.exceeding(planned):
                raise view.refusal(planned, "Refused")
            stamp = now()
            if mine is None:
                conn.execute(
                    "INSERT INTO spends (dataset_id, run_id, status, planned_history, history, "
                    "delta, created_at, updated_at, note, unit) VALUES (?, ?, 'reserved', ?, "
                    "'[]', ?, ?, ?, ?, ?)",
                    (dataset_id, run_id, to_json(planned), delta, stamp, stamp, note,
                     view.unit))
            else:
                conn.execute(
                    "UPDATE spends SET status = 'reserved', planned_history = ?, "
                    "delta = COALESCE(?, delta), updated_at = ?, note = COALESCE(?, note), "
                    "unit = ? WHERE dataset_id = ? AND run_id = ?",
                    (to_json(planned), delta, stamp, note, view.unit, dataset_id, run_id))
            self._reserved.setdefault(run_id, set()).add(dataset_id)
            return reservation(self._row(conn, dataset_id, run_id), resumed=mine is not None)

    def _run_spends(self, conn: sqlite3.Connection, run_id: str,
                    dataset_id: str | None) -> list[Reservation]:
        check_run(run_id)
        if dataset_id is None:
            rows = conn.execute("SELECT * FROM spends WHERE run_id = ? ORDER BY id", (run_id,))
            mine = self._reserved.get(run_id)
            found = [reservation(r) for r in rows]
            if mine:  # this handle's own reservations, not another site's of the same id
                found = [s for s in found if s.dataset_id in mine]
        else:
            check_dataset_id(dataset_id)
            rows = conn.execute("SELECT * FROM spends WHERE run_id = ? AND dataset_id = ?",
                                (run_id, dataset_id))
            found = [reservation(r) for r in rows]
        if not found:
            where = f" on dataset {dataset_id}" if dataset_id else ""
            raise ConfigError(f"Run {run_id} holds no reservation{where}; reserve first.")
        return found

    def _set(self, conn: sqlite3.Connection, spend: Reservation, status: str,
             history: History, planned: History | None = None) -> None:
        conn.execute(
            "UPDATE spends SET status = ?, history = ?, planned_history = ?, updated_at = ? "
            "WHERE dataset_id = ? AND run_id = ?",
            (status, to_json(history), to_json(planned or spend.planned_history), now(),
             spend.dataset_id, spend.run_id))

    def update(self, run_id: str, actual_history: Iterable[Sequence[float]],
               dataset_id: str | None = None) -> None:
        """Record a reserved run's progress (the whole history so far, e.g. after an epoch).

        Progress beyond the plan is recorded, since it has happened, and the plan grows
        to cover it; if one of the run's records is then over its budget,
        BudgetExceededError tells the run to stop.
        """
        actual = merge_history(actual_history)
        overspent: list[Exception] = []
        with self._connect(write=True) as conn:
            for spend in self._run_spends(conn, run_id, dataset_id):
                if spend.status != "reserved":
                    raise ConfigError(f"Run {run_id} is already {spend.status} on dataset "
                                      f"{spend.dataset_id}; its spend can no longer change.")
                grows = not history_covers(spend.planned_history, actual)
                planned = history_union(spend.planned_history, actual)
                self._set(conn, spend, "reserved", actual, planned)
                if grows:
                    view = self._view(conn, spend.dataset_id, None, spend.unit,
                                      exclude_run=run_id)
                    if view.exceeding(planned):
                        overspent.append(view.refusal(planned, "Stop"))
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
        """Every spend, oldest first, with its histories as JSON lists, its unit and its
        own epsilon (``epsilon``: the spend's charge alone, for display; totals compose)."""
        with self._connect() as conn:
            if dataset_id is None:
                rows = conn.execute("SELECT * FROM spends ORDER BY id").fetchall()
            else:
                rows = conn.execute("SELECT * FROM spends WHERE dataset_id = ? ORDER BY id",
                                    (check_dataset_id(dataset_id),)).fetchall()
            budgets = {ds: self._budget_row(conn, ds) for ds in {r["dataset_id"] for r in rows}}
        out = []
        for row in rows:
            spend = reservation(row)
            budget = budgets[spend.dataset_id]
            out.append({
                "id": row["id"], "dataset_id": spend.dataset_id, "run_id": spend.run_id,
                "status": spend.status, "unit": spend.unit,
                "planned_history": history_to_json(spend.planned_history),
                "history": history_to_json(spend.history),
                "steps": sum(n for *_, n in spend.charged_history),
                "epsilon": self._epsilon(spend, budget),
                "delta": budget["delta"] if budget else spend.delta,
                "created_at": spend.created_at, "updated_at": spend.updated_at,
                "note": spend.note})
        return out

    def summary(self) -> list[dict]:
        """Per dataset: budget epsilon/delta/accountant (None without one), the unit,
        spent (the most charged record's epsilon) and remaining, counts of runs
        (reserved + committed), reserved and committed, and the spend over its records:
        ``records`` and ``record_epsilon`` ``{min, median, max}`` and ``near_budget``
        (records at 90% of their budget or more), None each for a dataset without
        registered records."""
        with self._connect() as conn:
            ids = sorted({r[0] for r in conn.execute(
                "SELECT dataset_id FROM budgets UNION SELECT dataset_id FROM spends "
                "UNION SELECT DISTINCT dataset_id FROM members")})
            out = []
            for ds in ids:
                budget = self._budget_row(conn, ds)
                view = self._view(conn, ds, None)
                counts = dict(conn.execute(
                    "SELECT status, COUNT(*) FROM spends WHERE dataset_id = ? GROUP BY status",
                    (ds,)).fetchall())
                spread = view.distribution()
                counts = {k: counts.get(k, 0) for k in ("reserved", "committed")}
                out.append({
                    "dataset_id": ds, "unit": view.unit,
                    "epsilon": budget["epsilon"] if budget else None,
                    "delta": budget["delta"] if budget else None,
                    "accountant": budget["accountant"] if budget else None,
                    "spent": view.spent(), "remaining": view.remaining(),
                    "runs": counts["reserved"] + counts["committed"], **counts,
                    "records": spread["records"],
                    "record_epsilon": None if spread["records"] is None else
                    {k: spread[k] for k in ("min", "median", "max")},
                    "near_budget": spread["near_budget"]})
        return out
