"""The record-level ledger on disk: schema 1 files migrate, patient ids never reach the
file, two processes cannot both take the last budget of shared records, and
``privmed ledger show`` reports the spend over records."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from ledger_race import race
from typer.testing import CliRunner

from privmed.cli import app
from privmed.errors import BudgetExceededError, DataError
from privmed.privacy import BudgetLedger, compute_epsilon
from privmed.privacy.ledger import SCHEMA_VERSION
from privmed.privacy.records import PrivacyRecords

DELTA = 1e-5
A, B, C = "a" * 16, "b" * 16, "c" * 16
FIRST = [(1.4, 0.05, 200)]  # RDP epsilon 2.90 at DELTA
SECOND = [(3.0, 0.05, 200)]  # 1.03; with FIRST 3.10
RUN = [(2.0, 0.05, 200)]  # 1.72; twice 2.46


def eps(history):
    return compute_epsilon(history, DELTA, "rdp")


def keys(start: int, n: int) -> tuple[str, ...]:
    return tuple(f"{i:016x}" for i in range(start, start + n))


# The schema privmed wrote before issue 16 (user_version 1), verbatim.
_V1 = """
CREATE TABLE budgets (
    dataset_id TEXT PRIMARY KEY,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL CHECK (accountant IN ('prv', 'rdp')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    note TEXT
);
CREATE TABLE spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'released')),
    planned_history TEXT NOT NULL,
    history TEXT NOT NULL,
    delta REAL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    note TEXT,
    UNIQUE (dataset_id, run_id)
);
CREATE INDEX spends_by_run ON spends (run_id);
PRAGMA user_version = 1;
"""


def _v1_ledger(path: Path) -> None:
    first = json.dumps([{"noise_multiplier": 1.4, "sample_rate": 0.05, "steps": 200}])
    conn = sqlite3.connect(path)
    conn.executescript(_V1)
    conn.execute("INSERT INTO budgets VALUES (?, 3.0, ?, 'rdp', 't0', 't0', 'old budget')",
                 (A, DELTA))
    conn.execute("INSERT INTO spends (dataset_id, run_id, status, planned_history, history, "
                 "delta, created_at, updated_at, note) VALUES (?, 'old-run', 'committed', ?, "
                 "?, NULL, 't0', 't1', 'before issue 16')", (A, first, first))
    conn.commit()
    conn.close()


def test_a_schema_1_ledger_is_migrated_and_keeps_its_spends(tmp_path):
    path = tmp_path / "old.sqlite"
    _v1_ledger(path)
    ledger = BudgetLedger(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                           "'table'")} >= {"meta", "members"}
        (secret,) = conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()
        assert isinstance(secret, bytes) and len(secret) == 32
    conn.close()
    (entry,) = ledger.entries()
    assert (entry["run_id"], entry["status"], entry["unit"], entry["note"]) == (
        "old-run", "committed", "image", "before issue 16")
    assert ledger.spent(A) == pytest.approx(eps(FIRST))
    assert ledger.budget(A)["note"] == "old budget"
    # the old spend on the dataset id binds its records once a run names them ...
    records = PrivacyRecords("image", keys(0, 50))
    with pytest.raises(BudgetExceededError, match="all 50 images of dataset"):
        ledger.reserve(A, "new-run", SECOND, records=records)
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=records)
    # ... and follows them into a copy of the file minus one image
    with pytest.raises(BudgetExceededError, match="all 49 images"):
        ledger.reserve(B, "copy", SECOND, records=PrivacyRecords("image", keys(1, 49)))
    # opening it again changes nothing
    assert BudgetLedger(path).spent(A) == pytest.approx(eps(FIRST))
    assert len(BudgetLedger(path).entries()) == 1


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    BudgetLedger(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    with pytest.raises(DataError, match="newer privmed"):
        BudgetLedger(path)


def test_patient_ids_never_reach_the_file(tmp_path):
    pids = [f"MRN-{9_000_000 + i // 3}" for i in range(60)]  # 20 patients
    records = PrivacyRecords("patient", keys(0, 60), tuple(pids))
    path = tmp_path / "ledger.sqlite"
    ledger = BudgetLedger(path)
    ledger.set_budget(A, 8.0, DELTA, "rdp", records=records)
    ledger.check(B, RUN, records=records)
    ledger.reserve(B, "run", RUN, records=records)
    ledger.commit("run", RUN)
    with pytest.raises(BudgetExceededError):
        ledger.reserve(C, "big", [(0.5, 0.5, 1000)], records=records)
    assert ledger.spent(A) == pytest.approx(eps(RUN))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for pid in set(pids):
        assert pid.encode() not in stored and pid.encode("utf-16-le") not in stored
    with sqlite3.connect(path) as conn:
        patient_keys = {r[0] for r in conn.execute(
            "SELECT record_key FROM members WHERE record_key LIKE 'p:%'")}
    conn.close()
    assert len(patient_keys) == 20 and all(len(k) == 34 for k in patient_keys)
    # keyed with the ledger's own secret: another ledger keys the same patients otherwise
    other = tmp_path / "other" / "ledger.sqlite"
    BudgetLedger(other).set_budget(A, 8.0, DELTA, "rdp", records=records)
    with sqlite3.connect(other) as conn:
        elsewhere = {r[0] for r in conn.execute(
            "SELECT record_key FROM members WHERE record_key LIKE 'p:%'")}
    conn.close()
    assert len(elsewhere) == 20 and not elsewhere & patient_keys


_RACER = """
import json, sys, time
from pathlib import Path
from privmed.errors import BudgetExceededError
from privmed.privacy import BudgetLedger
from privmed.privacy.records import PrivacyRecords
folder, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ledger = BudgetLedger(folder / "ledger.sqlite")
for k in range(rounds):
    # two exports of the same 1,000 images, each with a few images of its own
    own = 100_000 * (1 + (me == "y"))
    keys = [f"{k * 10_000 + i:016x}" for i in range(1000)]
    keys += [f"{own + k * 10_000 + i:016x}" for i in range(10)]
    records = PrivacyRecords("image", tuple(keys))
    dataset = f"{k:015x}" + ("1" if me == "x" else "2")
    (folder / f"ready-{k}-{me}").touch()
    give_up = time.monotonic() + 300  # never outlive a parent that went away
    while not (folder / f"go-{k}").exists():
        if time.monotonic() > give_up:
            sys.exit("no go signal")
        time.sleep(0.001)
    try:
        ledger.reserve(dataset, f"run-{me}", [(2.0, 0.05, 200)], records=records)
        print(json.dumps([k, "ok"]), flush=True)
    except BudgetExceededError:
        print(json.dumps([k, "refused"]), flush=True)
"""


def test_two_processes_cannot_both_take_the_last_budget_of_shared_records(tmp_path):
    """Two runs on different dataset ids that share 1,000 images, with room for one."""
    rounds, names = 3, ("x", "y")
    ledger = BudgetLedger(tmp_path / "ledger.sqlite")
    for k in range(rounds):  # the shared images' budget, set on a third dataset holding them
        shared = PrivacyRecords("image", keys(k * 10_000, 1000))
        ledger.set_budget(f"{k:015x}0", 2.0, DELTA, "rdp", records=shared)
    results = race(_RACER, tmp_path, rounds, names)
    assert all(sorted(results[k]) == ["ok", "refused"] for k in range(rounds)), results
    for k in range(rounds):
        spends = [e for e in ledger.entries() if e["dataset_id"][:15] == f"{k:015x}"]
        assert len(spends) == 1
        assert ledger.spent(f"{k:015x}0") == pytest.approx(eps(RUN))


def test_ledger_show_reports_the_spend_over_records(tmp_path, monkeypatch):
    from privmed.cli.app import console

    # Rich fixed the console's width when it was made (xdist workers set COLUMNS=80).
    monkeypatch.setattr(console, "width", 240)
    path = tmp_path / "ledger.sqlite"
    ledger = BudgetLedger(path)
    records = PrivacyRecords("patient", keys(0, 40), tuple(f"P{i // 4}" for i in range(40)))
    ledger.set_budget(A, 3.3, DELTA, "rdp", records=records)  # 90%: 2.97
    ledger.reserve(A, "first", FIRST, records=records)
    ledger.commit("first", FIRST)
    half = PrivacyRecords("patient", keys(100, 20), tuple(f"P{i // 4}" for i in range(20)))
    ledger.reserve(B, "second", SECOND, records=half)  # 5 of the 10 patients, other images
    ledger.reserve(C, "unregistered", RUN, delta=DELTA)  # an id-only dataset
    runner = CliRunner()
    shown = runner.invoke(app, ["ledger", "show", str(path), "--runs"],
                          env={"COLUMNS": "240"})
    assert shown.exit_code == 0, shown.output
    for text in (A, B, C, "patient", "records", "2.903 / 3.004 / 3.104", "3.300",
                 "charged by their id alone"):
        assert text in shown.output, text
    as_json = runner.invoke(app, ["ledger", "show", str(path), "--json", "--runs"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    rows = {r["dataset_id"]: r for r in data["datasets"]}
    a = rows[A]
    assert (a["unit"], a["records"], a["near_budget"]) == ("patient", 10, 5)
    assert a["record_epsilon"]["min"] == pytest.approx(eps(FIRST))
    assert a["record_epsilon"]["max"] == pytest.approx(eps(FIRST + SECOND))
    assert a["record_epsilon"]["median"] == pytest.approx((eps(FIRST) + eps(FIRST + SECOND)) / 2)
    assert a["spent"] == a["record_epsilon"]["max"]
    assert rows[B]["records"] == 5
    assert rows[C]["records"] is None and rows[C]["remaining"] is None  # infinite: null
    assert [s["unit"] for s in data["spends"]] == ["patient", "patient", "image"]
