"""Record-level accounting: the ledger follows the people, not the file (issue 16).

A dataset id is a hash of a whole file: the same file minus one image, re-exported or
grown is a new id. So the ledger also stores which *records* each dataset id holds
(``members``): ``i:<pixel hash>`` for every image and, for patient-level runs,
``p:<HMAC-SHA256(ledger secret, patient id)>`` for every patient. A record's history is
the concatenation of the charged histories of every spend (same unit) on any dataset
holding it, and its budget the strictest budget of those datasets: a run costs what the
most charged of its records has left (a simple individual privacy filter, after
Feldman & Zrnic 2021).

Records are grouped by the set of datasets holding them (their *signature*), in SQL,
with one bit per dataset that matters (it holds a budget or a spend of the unit), so a
run on 100,000 records composes one history per signature, not per record.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from privmed.errors import BudgetExceededError, ConfigError, DataError
from privmed.privacy.accounting import History, compute_epsilon, merge_history
from privmed.privacy.ledger_store import Reservation, fmt, reservation
from privmed.privacy.records import PrivacyRecords

#: Record keys: 'i:' + pixel hash (image unit), 'p:' + keyed patient id (patient unit).
PREFIX = {"image": "i:", "patient": "p:"}
# A budget check compares floats computed the same way; this only absorbs rounding.
SLACK = 1e-9
_BITS = 62  # bits per signature word: sums of distinct powers of two stay in SQLite's int64
_IMAGE_KEY = re.compile(r"[0-9a-f]{16}")
#: A record counts as nearly spent at this share of its budget (``privmed ledger show``).
NEAR_BUDGET = 0.9


def _range(prefix: str) -> tuple[str, str]:
    """Keys starting with ``prefix`` ('x:') are those in [``x:``, ``x;``) (';' follows ':')."""
    return prefix, prefix[:-1] + ";"


@dataclass(frozen=True)
class RecordGroup:
    """Records held by the same datasets, hence with the same history and budget."""

    datasets: tuple[str, ...]
    #: How many records; None for a dataset known only by its id (no records registered).
    records: int | None
    history: History
    budget: dict | None
    #: The smallest delta the spends recorded: epsilon's delta when no budget applies.
    run_delta: float | None

    def epsilon(self, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        """Epsilon of the composed history (with ``extra``), at the budget's delta."""
        history = [*self.history, *extra]
        if not history:
            return 0.0
        if self.budget is not None:
            return compute_epsilon(history, self.budget["delta"], self.budget["accountant"])
        if self.run_delta is None:
            return math.nan  # no budget and no delta recorded: epsilon is undefined
        return compute_epsilon(history, self.run_delta, "prv")

    def over(self, extra: Sequence[tuple[float, float, int]]) -> bool:
        return self.budget is not None and (self.epsilon(extra)
                                            > self.budget["epsilon"] * (1 + SLACK))


@dataclass(frozen=True)
class RecordView:
    """A dataset's records (or, for an unregistered dataset, the dataset id alone) with
    their histories and budgets, as one unit composes them."""

    dataset_id: str
    unit: str
    groups: list[RecordGroup]
    per_record: bool

    @property
    def records(self) -> int | None:
        return sum(g.records or 0 for g in self.groups) if self.per_record else None

    def spent(self) -> float:
        """The most charged record's epsilon (NaN when one has no delta to account at)."""
        eps = [g.epsilon() for g in self.groups]
        return math.nan if any(math.isnan(e) for e in eps) else max(eps, default=0.0)

    def remaining(self) -> float:
        """What the most charged record has left: min over records of budget - spent."""
        left = [max(0.0, g.budget["epsilon"] - g.epsilon()) for g in self.groups if g.budget]
        return min(left, default=math.inf)

    def exceeding(self, planned: History) -> list[RecordGroup]:
        return [g for g in self.groups if g.over(planned)]

    def refusal(self, planned: History, verb: str) -> BudgetExceededError:
        """The one sentence of a refusal: how many records, the worst one's composed
        epsilon, its budget, what it had spent and what this run costs alone."""
        over = self.exceeding(planned) or [g for g in self.groups if g.budget]
        worst = max(over, key=lambda g: g.epsilon(planned) / g.budget["epsilon"])
        budget = worst.budget
        assert budget is not None
        total, spent = worst.epsilon(planned), worst.epsilon()
        alone = compute_epsilon(planned, budget["delta"], budget["accountant"])
        if not self.per_record:
            # Budgets compose (the accountant's epsilon of all histories together), so the
            # sentence compares the composed total with the budget, not epsilons added.
            return BudgetExceededError(
                f"{verb}: with this run, dataset {self.dataset_id} would reach epsilon "
                f"{fmt(total)} composed, over its budget of {fmt(budget['epsilon'])} "
                f"({fmt(spent)} spent so far; this run alone: {fmt(alone)}).")
        k, n = sum(g.records or 0 for g in over), self.records or 0
        who = (f"the only {self.unit}" if n == 1 else f"all {n} {self.unit}s" if k == n
               else f"{k} of the {n} {self.unit}s")
        return BudgetExceededError(
            f"{verb}: with this run, {who} of dataset {self.dataset_id} would exceed "
            f"{'its' if k == 1 else 'their'} budget: the most charged would reach epsilon "
            f"{fmt(total)} composed, over its budget of {fmt(budget['epsilon'])} "
            f"({fmt(spent)} spent on it so far; this run alone: {fmt(alone)}).")

    def distribution(self) -> dict:
        """Spend over records: count, min / median / max epsilon per record, and how many
        records have used at least 90% of their budget (None each for an unregistered
        dataset)."""
        if not self.per_record:
            return {"records": None, "min": None, "median": None, "max": None,
                    "near_budget": None}
        ranked = sorted(((g.epsilon(), g.records or 0) for g in self.groups),
                        key=lambda x: (math.isnan(x[0]), x[0]))
        n = sum(c for _, c in ranked)

        def nth(i: int) -> float:
            for eps, count in ranked:
                if i < count:
                    return eps
                i -= count
            return math.nan

        near = sum(g.records or 0 for g in self.groups
                   if g.budget and g.epsilon() >= NEAR_BUDGET * g.budget["epsilon"])
        return {"records": n, "min": nth(0) if n else None,
                "median": (nth((n - 1) // 2) + nth(n // 2)) / 2 if n else None,
                "max": self.spent() if n else None, "near_budget": near}


# ---------------------------------------------------------------- record keys


def ledger_secret(conn: sqlite3.Connection) -> bytes:
    row = conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()
    if row is None:
        raise DataError("The privacy ledger lost its secret (meta table): it is damaged.")
    return bytes(row[0])


def patient_key(secret: bytes, patient_id: str) -> str:
    """'p:' + HMAC-SHA256 of the patient id under the ledger's secret (128 bits): the same
    patient gets the same key in this ledger, and the raw id is never stored."""
    return "p:" + hmac.new(secret, str(patient_id).encode("utf-8"),
                           hashlib.sha256).hexdigest()[:32]


def record_keys(records: PrivacyRecords, secret: bytes) -> list[str]:
    """Every image's key and, for a patient-level run, every patient's."""
    keys = []
    for key in records.image_keys:
        if not (isinstance(key, str) and _IMAGE_KEY.fullmatch(key)):
            # never echo the value: a patient id passed here by mistake must not leak
            raise ConfigError("An image key is 16 lowercase hex characters (a pixel hash, "
                              "privacy.records.image_keys); got another value.")
        keys.append("i:" + key)
    if records.unit == "patient":
        keys.extend({patient_key(secret, p) for p in records.patient_ids or ()})
    return keys


def load_request(conn: sqlite3.Connection, dataset_id: str,
                 records: PrivacyRecords | None) -> bool:
    """Fill the connection's temporary ``ledger_request`` table with the keys of
    ``records``, or (None) with those registered for ``dataset_id``; False when there are
    none (a dataset known only by its id)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS ledger_request "
                 "(record_key TEXT PRIMARY KEY) WITHOUT ROWID")
    conn.execute("DELETE FROM temp.ledger_request")
    if records is not None:
        conn.executemany("INSERT OR IGNORE INTO temp.ledger_request (record_key) VALUES (?)",
                         ((k,) for k in record_keys(records, ledger_secret(conn))))
    else:
        conn.execute("INSERT INTO temp.ledger_request (record_key) SELECT record_key "
                     "FROM members WHERE dataset_id = ?", (dataset_id,))
    return conn.execute("SELECT EXISTS (SELECT 1 FROM temp.ledger_request)").fetchone()[0] == 1


def register(conn: sqlite3.Connection, dataset_id: str) -> None:
    """Record that ``dataset_id`` holds the loaded records (idempotent)."""
    conn.execute("INSERT OR IGNORE INTO members (record_key, dataset_id) "
                 "SELECT record_key, ? FROM temp.ledger_request", (dataset_id,))


def dataset_unit(conn: sqlite3.Connection, dataset_id: str) -> str:
    """The unit of the dataset's latest spend; else patient when patients are registered."""
    row = conn.execute("SELECT unit FROM spends WHERE dataset_id = ? AND status != 'released' "
                       "ORDER BY id DESC LIMIT 1", (dataset_id,)).fetchone()
    if row is not None:
        return str(row[0])
    lo, hi = _range(PREFIX["patient"])
    row = conn.execute("SELECT 1 FROM members WHERE dataset_id = ? AND record_key >= ? AND "
                       "record_key < ? LIMIT 1", (dataset_id, lo, hi)).fetchone()
    return "patient" if row else "image"


def check_units(conn: sqlite3.Connection, dataset_id: str, unit: str) -> None:
    """Refuse (ConfigError) a run whose images belong to a dataset charged in the other
    unit: the loaded request must hold the run's image keys."""
    lo, hi = _range(PREFIX["image"])
    row = conn.execute(
        "SELECT dataset_id, unit FROM spends WHERE status != 'released' AND unit != ? AND "
        "(dataset_id = ? OR dataset_id IN (SELECT m.dataset_id FROM temp.ledger_request q "
        "JOIN members m ON m.record_key = q.record_key WHERE q.record_key >= ? AND "
        "q.record_key < ?)) ORDER BY id LIMIT 1", (unit, dataset_id, lo, hi)).fetchone()
    if row is not None:
        other = row["unit"]
        raise ConfigError(
            f"Refused: images of this run were already charged per {other} (dataset "
            f"{row['dataset_id']}) and this run would be charged per {unit}, but a per-image "
            "epsilon covers a patient only by group privacy (k images: about k times "
            "epsilon), so the ledger keeps one unit per record: train with "
            f"--privacy-unit {other} as the earlier runs did.")


# ---------------------------------------------------------------- composition


def _signatures(conn: sqlite3.Connection, datasets: list[str], prefix: str
                ) -> list[tuple[frozenset[str], int]]:
    """(set of ``datasets`` holding them, count) for the loaded records of ``prefix``."""
    lo, hi = _range(prefix)
    if not datasets:
        (count,) = conn.execute("SELECT COUNT(*) FROM temp.ledger_request WHERE record_key "
                                ">= ? AND record_key < ?", (lo, hi)).fetchone()
        return [(frozenset(), count)] if count else []
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS ledger_bits "
                 "(dataset_id TEXT PRIMARY KEY, word INTEGER NOT NULL, bit INTEGER NOT NULL)")
    conn.execute("DELETE FROM temp.ledger_bits")
    conn.executemany("INSERT INTO temp.ledger_bits VALUES (?, ?, ?)",
                     [(d, i // _BITS, 1 << (i % _BITS)) for i, d in enumerate(datasets)])
    words = range((len(datasets) - 1) // _BITS + 1)
    sums = ", ".join(f"SUM(CASE WHEN b.word = {w} THEN b.bit ELSE 0 END) AS w{w}"
                     for w in words)
    cols = ", ".join(f"w{w}" for w in words)
    rows = conn.execute(
        f"SELECT {cols}, COUNT(*) FROM (SELECT {sums} FROM temp.ledger_request q "
        "LEFT JOIN members m ON m.record_key = q.record_key "
        "AND m.dataset_id IN (SELECT dataset_id FROM temp.ledger_bits) "
        "LEFT JOIN temp.ledger_bits b ON b.dataset_id = m.dataset_id "
        f"WHERE q.record_key >= ? AND q.record_key < ? GROUP BY q.record_key) GROUP BY {cols}",
        (lo, hi)).fetchall()
    out = []
    for row in rows:
        held = frozenset(datasets[w * _BITS + b] for w in words for b in range(_BITS)
                         if (row[w] or 0) >> b & 1)
        out.append((held, row[len(words)]))
    return out


def _group(datasets: Iterable[str], records: int | None, spends: list[Reservation],
           budgets: dict[str, dict]) -> RecordGroup:
    datasets = tuple(sorted(datasets))
    budget = min((budgets[d] for d in datasets if d in budgets),
                 key=lambda b: (b["epsilon"], b["delta"]), default=None)
    deltas = [s.delta for s in spends if s.delta is not None]
    return RecordGroup(datasets, records,
                       merge_history(e for s in spends for e in s.charged_history),
                       budget, min(deltas, default=None))


def record_view(conn: sqlite3.Connection, dataset_id: str, unit: str, per_record: bool,
                exclude_run: str | None = None) -> RecordView:
    """The loaded records of ``unit`` (``per_record``), or the dataset id alone, grouped
    with their charged histories and budgets; the spend of ``exclude_run`` on
    ``dataset_id`` is left out (the run being re-planned)."""
    budgets = {r["dataset_id"]: dict(r) for r in conn.execute("SELECT * FROM budgets")}

    def mine(s: Reservation) -> bool:
        return s.dataset_id == dataset_id and s.run_id == exclude_run

    if not per_record:
        spends = [reservation(r) for r in conn.execute(
            "SELECT * FROM spends WHERE dataset_id = ? ORDER BY id", (dataset_id,))]
        return RecordView(dataset_id, unit, [_group(
            (dataset_id,), None, [s for s in spends if not mine(s)], budgets)], False)
    prefix = PREFIX[unit]
    lo, hi = _range(prefix)
    matter = {r[0] for r in conn.execute(
        "SELECT dataset_id FROM spends WHERE status != 'released' AND unit = ?", (unit,))}
    matter |= set(budgets)
    touched = {r[0] for r in conn.execute(
        "SELECT DISTINCT m.dataset_id FROM temp.ledger_request q JOIN members m "
        "ON m.record_key = q.record_key WHERE q.record_key >= ? AND q.record_key < ?",
        (lo, hi))}
    others = sorted((touched & matter) - {dataset_id})
    # every loaded record is held by dataset_id, registered yet or not
    own = frozenset({dataset_id}) if dataset_id in matter else frozenset()
    counts: dict[frozenset[str], int] = {}
    for held, count in _signatures(conn, others, prefix):
        counts[held | own] = counts.get(held | own, 0) + count
    if not counts:
        return record_view(conn, dataset_id, unit, False, exclude_run)
    spent_on: dict[str, list[Reservation]] = {}
    wanted = [*others, *own]
    for i in range(0, len(wanted), 500):  # SQLite's limit on bound parameters
        chunk = wanted[i:i + 500]
        for row in conn.execute(
                "SELECT * FROM spends WHERE status != 'released' AND unit = ? AND dataset_id "
                f"IN ({', '.join('?' * len(chunk))}) ORDER BY id", (unit, *chunk)):
            spend = reservation(row)
            if not mine(spend):
                spent_on.setdefault(spend.dataset_id, []).append(spend)
    groups = [_group(held, count, [s for d in sorted(held) for s in spent_on.get(d, [])],
                     budgets) for held, count in counts.items()]
    return RecordView(dataset_id, unit, groups, True)
