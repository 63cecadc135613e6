"""The privacy ledger's SQLite file: schema, migrations, transactions and stored rows.

Schema 2 (issue 16) adds what record-level accounting needs: ``meta`` holds a random
secret that keys patient ids before they are stored (a raw id, maybe an MRN, never is),
``members`` says which records (``i:<pixel hash>`` per image, ``p:<keyed patient id>``
per patient) each dataset id holds, and every spend records its privacy ``unit``.
A schema-1 file is migrated in place (its spends become image-level ones).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from privmed.errors import ConfigError, DataError
from privmed.privacy.accounting import (
    History,
    history_from_json,
    history_to_json,
    history_union,
    merge_history,
)

SCHEMA_VERSION = 2
_DATASET_ID = re.compile(r"[0-9a-f]{16}")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NOTE_MAX = 200
_TABLES = {"budgets", "spends", "meta", "members"}

_SCHEMA_V1 = """
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

# Schema 1 -> 2. Old spends carried no unit: they were per image.
_MIGRATE_1_2 = """
ALTER TABLE spends ADD COLUMN unit TEXT NOT NULL DEFAULT 'image'
    CHECK (unit IN ('image', 'patient'));
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    record_key TEXT NOT NULL,  -- 'i:' + pixel hash, or 'p:' + HMAC-SHA256(secret, patient)
    dataset_id TEXT NOT NULL,
    PRIMARY KEY (record_key, dataset_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_dataset ON members (dataset_id, record_key);
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
    #: What the run's epsilon protects: 'image' or 'patient'.
    unit: str = "image"

    @property
    def charged_history(self) -> History:
        """What the ledger counts against the budget for this spend."""
        if self.status == "committed":
            return list(self.history)
        if self.status == "reserved":
            return history_union(self.planned_history, self.history)
        return []


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fmt(eps: float) -> str:
    if math.isinf(eps):
        return "infinite"
    if math.isnan(eps):
        return "undefined"
    return f"{eps:.2f}" if eps >= 0.1 or eps == 0 else f"{eps:.2g}"


def check_dataset_id(dataset_id: str) -> str:
    if not (isinstance(dataset_id, str) and _DATASET_ID.fullmatch(dataset_id)):
        raise ConfigError(f"A dataset id is 16 lowercase hex characters, got {dataset_id!r}.")
    return dataset_id


def check_run(run_id: str) -> None:
    if not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
        raise ConfigError(f"A run id is 1-128 letters, digits or '._:-', got {run_id!r}.")


def check_note(note: str | None) -> None:
    if note is not None and (not isinstance(note, str) or len(note) > _NOTE_MAX):
        raise ConfigError(f"A ledger note must be text of at most {_NOTE_MAX} characters.")


def number(value: object) -> float:
    """``float(value)`` for real numbers (bools excluded), NaN for anything else."""
    try:
        return math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def to_json(history: Iterable[Sequence[float]]) -> str:
    return json.dumps(history_to_json(merge_history(history)))


def reservation(row: sqlite3.Row, resumed: bool = False) -> Reservation:
    return Reservation(
        dataset_id=row["dataset_id"], run_id=row["run_id"], status=row["status"],
        planned_history=history_from_json(json.loads(row["planned_history"])),
        history=history_from_json(json.loads(row["history"])), delta=row["delta"],
        created_at=row["created_at"], updated_at=row["updated_at"], note=row["note"],
        resumed=resumed, unit=row["unit"])


class LedgerStore:
    """The SQLite file ``path``: fresh connections, one transaction each."""

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
            if version == 0 and tables - _TABLES:
                raise DataError(f"{self.path} is an SQLite database but not a privmed ledger.")
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise DataError(f"The privacy ledger {self.path} is damaged (integrity check "
                                "failed).")
            if version == 0:
                _run_script(conn, _SCHEMA_V1)
                version = 1
            if version == 1:
                _run_script(conn, _MIGRATE_1_2)  # DDL is transactional: all or nothing
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('secret', ?)",
                             (secrets.token_bytes(32),))
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def import_ledger(self, other: str | Path) -> int:
        """Copy another ledger file's budgets, spends and image records into this one
        (a dataset's budget here is kept; a spend already here is skipped); returns how
        many spends were copied. Its patient records are not: they are keyed with that
        file's own secret."""
        source = LedgerStore(other)
        with source._connect() as conn:
            budgets = [dict(r) for r in conn.execute("SELECT * FROM budgets")]
            spends = [dict(r) for r in conn.execute("SELECT * FROM spends ORDER BY id")]
            members = conn.execute("SELECT record_key, dataset_id FROM members WHERE "
                                   "record_key >= 'i:' AND record_key < 'i;'").fetchall()
        budget_cols = ("dataset_id", "epsilon", "delta", "accountant", "created_at",
                       "updated_at", "note")
        spend_cols = ("dataset_id", "run_id", "status", "planned_history", "history", "delta",
                      "created_at", "updated_at", "note", "unit")
        with self._connect(write=True) as conn:
            conn.executemany(
                f"INSERT OR IGNORE INTO budgets ({', '.join(budget_cols)}) VALUES "
                f"({', '.join('?' * len(budget_cols))})",
                [tuple(b[c] for c in budget_cols) for b in budgets])
            before = conn.total_changes
            conn.executemany(
                f"INSERT OR IGNORE INTO spends ({', '.join(spend_cols)}) VALUES "
                f"({', '.join('?' * len(spend_cols))})",
                [tuple(s[c] for c in spend_cols) for s in spends])
            copied = conn.total_changes - before
            conn.executemany("INSERT OR IGNORE INTO members (record_key, dataset_id) "
                             "VALUES (?, ?)", [tuple(m) for m in members])
        return copied


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """``executescript`` would COMMIT the open transaction; run statement by statement."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
