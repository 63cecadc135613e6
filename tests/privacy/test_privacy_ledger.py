"""The SQLite privacy-budget ledger, on real files (and real concurrent processes)."""

from __future__ import annotations

import math
import re
import sqlite3

import pytest
from ledger_race import race

from privmed.errors import BudgetExceededError, ConfigError, DataError
from privmed.privacy import BudgetLedger, compute_epsilon
from privmed.privacy.ledger import SCHEMA_VERSION

DS = "0123456789abcdef"
OTHER = "fedcba9876543210"
DELTA = 1e-5
# RDP epsilons (cheap to account): RUN_A 1.72, RUN_A twice composed 2.46, RUN_B 1.18.
RUN_A = [(2.0, 0.05, 200)]
RUN_B = [(1.5, 0.02, 300)]
ONE_A = 2.0  # a budget with room for one RUN_A, not two


@pytest.fixture
def ledger(tmp_path):
    return BudgetLedger(tmp_path / "ledger.db")


def eps(history):
    return compute_epsilon(history, DELTA, "rdp")


def test_refuses_overspend_before_recording_anything(ledger):
    ledger.set_budget(DS, 1.0, DELTA, "rdp")
    ledger.reserve(DS, "run-a", [(4.0, 0.05, 100)])
    before = ledger.spent(DS)
    planned = [(0.8, 0.1, 500)]
    with pytest.raises(BudgetExceededError) as info:
        ledger.reserve(DS, "run-b", planned)
    message = str(info.value)
    match = re.fullmatch(
        r"Refused: with this run, dataset (\w+) would reach epsilon ([\d.]+) composed, over "
        r"its budget of ([\d.]+) \(([\d.]+) spent so far; this run alone: ([\d.]+)\)\.",
        message)
    assert match, message
    dataset, total, budget, spent, alone = match.groups()
    assert dataset == DS
    assert float(total) == pytest.approx(eps([(4.0, 0.05, 100)] + planned), abs=0.005)
    assert float(total) > float(budget) == 1.0
    assert float(alone) == pytest.approx(eps(planned), abs=0.005)
    assert float(spent) == pytest.approx(before, abs=0.005)
    assert [e["run_id"] for e in ledger.entries()] == ["run-a"]
    assert ledger.spent(DS) == before


def test_spends_compose_across_runs(ledger):
    ledger.set_budget(DS, 10.0, DELTA, "rdp")
    ledger.reserve(DS, "a", RUN_A)
    ledger.commit("a", RUN_A)
    ledger.reserve(DS, "b", RUN_B)
    total = ledger.spent(DS)
    assert total == pytest.approx(eps(RUN_A + RUN_B), rel=1e-9)
    assert max(eps(RUN_A), eps(RUN_B)) < total < eps(RUN_A) + eps(RUN_B)
    assert ledger.remaining(DS) == pytest.approx(10.0 - total)
    # Epsilons are composed, not added: a plan whose own epsilon exceeds what is left
    # fits when the composition stays within the budget, and is refused when it does not.
    ledger.set_budget(DS, eps(RUN_A + RUN_B + RUN_A) + 0.02, DELTA, "rdp")
    assert eps(RUN_A) > ledger.remaining(DS)
    with pytest.raises(BudgetExceededError):
        ledger.reserve(DS, "c", [(2.0, 0.05, 260)])
    ledger.reserve(DS, "c", RUN_A)
    assert ledger.spent(DS) == pytest.approx(eps(RUN_A + RUN_B + RUN_A))


def test_reservation_is_idempotent_for_a_resumed_run(ledger):
    ledger.set_budget(DS, ONE_A, DELTA, "rdp")
    first = ledger.reserve(DS, "run-1", RUN_A)
    assert not first.resumed and first.status == "reserved"
    spent = ledger.spent(DS)
    assert eps(RUN_A + RUN_A) > ONE_A  # so a second charge would be refused
    again = ledger.reserve(DS, "run-1", RUN_A)
    assert again.resumed and again.planned_history == RUN_A
    ledger.update("run-1", [(2.0, 0.05, 80)])
    resumed = ledger.reserve(DS, "run-1", RUN_A)
    assert resumed.history == [(2.0, 0.05, 80)]
    assert ledger.spent(DS) == spent
    assert len(ledger.entries(DS)) == 1
    # A resumed run that now plans more is charged only for the growth, and refused if
    # the growth does not fit.
    with pytest.raises(BudgetExceededError):
        ledger.reserve(DS, "run-1", [(2.0, 0.05, 2000)])
    assert ledger.spent(DS) == spent


def test_commit_with_fewer_steps_lowers_the_spend(ledger):
    ledger.set_budget(DS, 5.0, DELTA, "rdp")
    ledger.reserve(DS, "r", [(1.5, 0.05, 400)])
    reserved = ledger.spent(DS)
    assert reserved == pytest.approx(eps([(1.5, 0.05, 400)]))
    ledger.update("r", [(1.5, 0.05, 100)])
    assert ledger.spent(DS) == reserved  # still reserved: the plan is still charged
    ledger.commit("r", [(1.5, 0.05, 150)])
    assert ledger.spent(DS) == pytest.approx(eps([(1.5, 0.05, 150)]))
    assert ledger.spent(DS) < reserved
    (entry,) = ledger.entries()
    assert entry["status"] == "committed" and entry["steps"] == 150
    assert entry["history"] == [{"noise_multiplier": 1.5, "sample_rate": 0.05, "steps": 150}]


def test_committed_spends_are_permanent(ledger):
    ledger.reserve(DS, "r", RUN_A)
    ledger.commit("r", RUN_A)
    with pytest.raises(ConfigError):
        ledger.release("r")
    with pytest.raises(ConfigError):
        ledger.commit("r", [(2.0, 0.05, 10)])
    with pytest.raises(ConfigError):
        ledger.update("r", RUN_A)
    ledger.commit("r", RUN_A)  # the same again is fine
    with pytest.raises(ConfigError):
        ledger.commit("never-reserved", RUN_A)


def test_release_returns_an_unused_reservation(ledger):
    ledger.set_budget(DS, ONE_A, DELTA, "rdp")
    ledger.reserve(DS, "crashed", RUN_A)
    ledger.release("crashed")
    assert ledger.spent(DS) == 0.0
    ledger.reserve(DS, "next", RUN_A)  # the budget is free again
    ledger.update("next", [(2.0, 0.05, 5)])
    with pytest.raises(ConfigError, match="already took steps"):
        ledger.release("next")


def test_progress_beyond_the_plan_is_recorded_then_stops_the_run(ledger):
    ledger.set_budget(DS, ONE_A, DELTA, "rdp")
    ledger.reserve(DS, "r", RUN_A)
    with pytest.raises(BudgetExceededError, match=r"^Stop: "):
        ledger.update("r", [(2.0, 0.05, 1000)])
    assert ledger.entries()[0]["history"][0]["steps"] == 1000
    assert ledger.spent(DS) == pytest.approx(eps([(2.0, 0.05, 1000)]))
    assert ledger.remaining(DS) == 0.0


def test_budgets_can_move(ledger):
    assert ledger.budget(DS) is None
    ledger.set_budget(DS, 3.0, DELTA, "rdp", note="initial")
    ledger.reserve(DS, "r", RUN_A)
    ledger.set_budget(DS, 0.5, DELTA, "rdp")  # below what is spent: allowed
    assert ledger.budget(DS)["epsilon"] == 0.5 and ledger.budget(DS)["note"] == "initial"
    assert ledger.remaining(DS) == 0.0
    with pytest.raises(BudgetExceededError):
        ledger.reserve(DS, "small", [(20.0, 0.01, 1)])
    ledger.set_budget(DS, 4.0, DELTA, "prv")
    ledger.reserve(DS, "small", [(20.0, 0.01, 1)])
    assert ledger.spent(DS) == pytest.approx(
        compute_epsilon(RUN_A + [(20.0, 0.01, 1)], DELTA, "prv"))
    for bad in [(DS, 0.0, DELTA), (DS, 1.0, 1.0), (DS, math.nan, DELTA), ("Jane Doe", 1, DELTA)]:
        with pytest.raises(ConfigError):
            ledger.set_budget(*bad)


def test_without_a_budget(ledger):
    r = ledger.reserve(OTHER, "r", RUN_A, delta=DELTA)
    assert r.status == "reserved" and ledger.remaining(OTHER) == math.inf
    assert ledger.spent(OTHER) == pytest.approx(compute_epsilon(RUN_A, DELTA, "prv"))
    with pytest.raises(ConfigError, match="No privacy budget"):
        ledger.reserve(DS, "r", RUN_A, require_budget=True)
    assert [e["dataset_id"] for e in ledger.entries()] == [OTHER]


def test_summary_and_persistence(tmp_path):
    path = tmp_path / "new" / "dir" / "ledger.db"  # folders are created
    first = BudgetLedger(path)
    first.set_budget(DS, 4.0, DELTA, "rdp")
    first.reserve(DS, "a", RUN_A)
    first.commit("a", RUN_A)
    first.reserve(DS, "b", RUN_B)
    first.reserve(OTHER, "c", RUN_B, delta=DELTA)
    rows = {r["dataset_id"]: r for r in BudgetLedger(path).summary()}
    assert rows[DS]["runs"] == 2 and rows[DS]["committed"] == 1 and rows[DS]["reserved"] == 1
    assert rows[DS]["spent"] == pytest.approx(eps(RUN_A + RUN_B))
    assert rows[DS]["remaining"] == pytest.approx(4.0 - eps(RUN_A + RUN_B))
    assert rows[OTHER]["epsilon"] is None and rows[OTHER]["remaining"] == math.inf
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ConfigError):
        first.reserve(DS, "has a space", RUN_A)


def test_corrupt_or_foreign_files_are_data_errors(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(DataError, match=re.escape(str(junk))):
        BudgetLedger(junk)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE patients (name TEXT)")
    conn.close()
    with pytest.raises(DataError, match="not a privmed ledger"):
        BudgetLedger(foreign)
    good = tmp_path / "good.db"
    BudgetLedger(good).set_budget(DS, 1.0, DELTA)
    data = bytearray(good.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # wreck the schema page, keep the header
    good.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"good.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(DataError, match=re.escape(str(good))):
        BudgetLedger(good).spent(DS)
    with pytest.raises(DataError, match="folder"):
        BudgetLedger(tmp_path)


_RACER = """
import json, sys, time
from pathlib import Path
from privmed.errors import BudgetExceededError
from privmed.privacy import BudgetLedger
folder, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ledger = BudgetLedger(folder / "ledger.db")
for k in range(rounds):
    (folder / f"ready-{k}-{me}").touch()
    give_up = time.monotonic() + 300  # never outlive a parent that went away
    while not (folder / f"go-{k}").exists():
        if time.monotonic() > give_up:
            sys.exit("no go signal")
        time.sleep(0.001)
    try:
        ledger.reserve(f"{k:016x}", f"run-{me}", [(2.0, 0.05, 200)])
        print(json.dumps([k, "ok"]), flush=True)
    except BudgetExceededError:
        print(json.dumps([k, "refused"]), flush=True)
"""


def test_two_processes_cannot_both_take_the_last_budget(tmp_path):
    rounds, names = 4, ("x", "y")
    ledger = BudgetLedger(tmp_path / "ledger.db")
    for k in range(rounds):
        ledger.set_budget(f"{k:016x}", ONE_A, DELTA, "rdp")
    results = race(_RACER, tmp_path, rounds, names)
    for k in range(rounds):
        assert sorted(results[k]) == ["ok", "refused"], results
        dataset = f"{k:016x}"
        assert len(ledger.entries(dataset)) == 1
        assert ledger.spent(dataset) == pytest.approx(eps(RUN_A))
