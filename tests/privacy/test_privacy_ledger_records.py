"""The ledger follows the records (images, patients), not the dataset file (issue 16)."""

from __future__ import annotations

import re
import time

import pytest

from privmed.errors import BudgetExceededError, ConfigError
from privmed.privacy import BudgetLedger, compute_epsilon
from privmed.privacy.records import PrivacyRecords

DELTA = 1e-5
A, B, C, D, E = (f"{c}" * 16 for c in "abcde")
# RDP epsilons at DELTA: FIRST 2.90, SECOND 1.03, FIRST + SECOND 3.10, TINY 0.025,
# FIRST + TINY 2.903: a budget of 3 holds FIRST and TINY, never FIRST and SECOND.
FIRST = [(1.4, 0.05, 200)]
SECOND = [(3.0, 0.05, 200)]
TINY = [(20.0, 0.05, 10)]


def eps(history):
    return compute_epsilon(history, DELTA, "rdp")


def keys(start: int, n: int) -> tuple[str, ...]:
    return tuple(f"{i:016x}" for i in range(start, start + n))


def images(start: int, n: int) -> PrivacyRecords:
    return PrivacyRecords("image", keys(start, n))


def patients(start: int, pids: list[str], unit: str = "patient") -> PrivacyRecords:
    return PrivacyRecords(unit, keys(start, len(pids)), tuple(pids))


@pytest.fixture
def ledger(tmp_path):
    return BudgetLedger(tmp_path / "ledger.sqlite")


def _spend(ledger: BudgetLedger, dataset: str, run: str, history, records) -> None:
    ledger.reserve(dataset, run, history, records=records)
    ledger.commit(run, history)


def test_the_same_file_minus_one_image_keeps_its_spend(ledger):
    """The issue's PneumoniaMNIST story: budget 3, a run at 2.9, then the same file minus
    one image (a new dataset id) at 1 more is refused, whatever budget the new id gets."""
    full, shrunk = images(0, 100), PrivacyRecords("image", keys(1, 99))
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=full)
    _spend(ledger, A, "first", FIRST, full)
    assert ledger.spent(A) == pytest.approx(eps(FIRST))
    for budget in (None, 3.0):  # a fresh budget on the new id gives no fresh budget
        if budget is not None:
            ledger.set_budget(B, budget, DELTA, "rdp")
        with pytest.raises(BudgetExceededError) as info:
            ledger.reserve(B, "second", SECOND, records=shrunk)
        match = re.fullmatch(
            rf"Refused: with this run, all 99 images of dataset {B} would exceed their "
            r"budget: the most charged would reach epsilon ([\d.]+) composed, over its "
            r"budget of 3\.00 \(([\d.]+) spent on it so far; this run alone: ([\d.]+)\)\.",
            str(info.value))
        assert match, str(info.value)
        total, spent, alone = map(float, match.groups())
        assert total == pytest.approx(eps(FIRST + SECOND), abs=0.005)
        assert spent == pytest.approx(eps(FIRST), abs=0.005)
        assert alone == pytest.approx(eps(SECOND), abs=0.005)
        assert [e["run_id"] for e in ledger.entries()] == ["first"]  # nothing recorded
    # the new id reports what its records have spent, not a fresh 0
    assert ledger.spent(B, records=shrunk) == pytest.approx(eps(FIRST))
    assert ledger.remaining(B, records=shrunk) == pytest.approx(3.0 - eps(FIRST))
    # a run that fits what is left is charged to the records, also as seen from A
    _spend(ledger, B, "tiny", TINY, shrunk)
    assert ledger.spent(A) == pytest.approx(eps(FIRST + TINY))
    assert ledger.spent(B) == pytest.approx(eps(FIRST + TINY))  # registered: per record
    groups = ledger.record_groups(A)
    assert [(g["datasets"], g["records"]) for g in groups] == [([A, B], 99), ([A], 1)]
    assert groups[1]["epsilon"] == pytest.approx(eps(FIRST))  # the removed image


def test_a_grown_dataset_is_refused_for_its_old_records_only(ledger):
    old = images(0, 100)
    grown = images(0, 120)  # the same 100 images and 20 new ones
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=old)
    _spend(ledger, A, "first", FIRST, old)
    with pytest.raises(BudgetExceededError, match=rf"100 of the 120 images of dataset {C} "
                       "would exceed their budget"):
        ledger.reserve(C, "grown", SECOND, records=grown)
    groups = {tuple(g["datasets"]): g for g in ledger.record_groups(C, records=grown)}
    assert groups[(A,)]["records"] == 100
    assert groups[(A,)]["epsilon"] == pytest.approx(eps(FIRST))
    assert groups[(A,)]["budget_epsilon"] == 3.0
    assert groups[()] == {"datasets": [], "records": 20, "epsilon": 0.0,
                          "budget_epsilon": None, "unit": "image"}  # the new ones: fresh
    # the new images alone may be used
    ledger.reserve(D, "new-only", SECOND, records=images(100, 20))
    # a budget given to the grown dataset binds its records, the strictest one wins
    ledger.set_budget(C, 0.5, DELTA, "rdp", records=grown)
    assert ledger.remaining(C) == 0.0
    assert ledger.remaining(D) == 0.0  # D's images are C's: over C's budget of 0.5
    assert ledger.spent(E, records=images(500, 3)) == 0.0
    assert ledger.remaining(E, records=images(500, 3)) == float("inf")


def test_patient_level_runs_compose_by_patient_across_datasets(ledger):
    """Two exports with different images of the same patients share the patients' spend."""
    pids = [f"MRN-{i // 3:05d}" for i in range(30)]  # 10 patients, 3 images each
    first = patients(0, pids)
    second = patients(1000, pids[::-1])  # other images, same patients
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=first)
    _spend(ledger, A, "first", FIRST, first)
    with pytest.raises(BudgetExceededError, match=rf"all 10 patients of dataset {B} would "
                       "exceed their budget"):
        ledger.reserve(B, "second", SECOND, records=second)
    # half of the patients are new: 5 of them would exceed, the run is refused
    half = patients(2000, [f"MRN-{i:05d}" for i in range(5, 15)])
    with pytest.raises(BudgetExceededError, match=rf"5 of the 10 patients of dataset {C}"):
        ledger.reserve(C, "half", SECOND, records=half)
    # other patients are fresh; a patient's spend is per patient, not per image
    others = patients(3000, ["X1", "X1", "X2"])
    ledger.set_budget(D, 3.0, DELTA, "rdp", records=others)
    ledger.reserve(D, "others", SECOND, records=others)
    assert ledger.spent(D) == pytest.approx(eps(SECOND))
    assert ledger.summary()[0]["unit"] == "patient"
    assert ledger.spent(B, records=second) == pytest.approx(eps(FIRST))
    rows = {r["dataset_id"]: r for r in ledger.summary()}
    assert rows[A]["records"] == 10 and rows[D]["records"] == 2
    assert [e["unit"] for e in ledger.entries()] == ["patient", "patient"]


def test_mixing_units_on_the_same_images_is_refused(ledger):
    pids = [f"P{i // 2}" for i in range(20)]
    per_image = PrivacyRecords("image", keys(0, 20), tuple(pids))
    _spend(ledger, A, "images", FIRST, per_image)
    overlap = patients(10, [f"Q{i}" for i in range(20)])  # shares images 10..19 with A
    with pytest.raises(ConfigError) as info:
        ledger.reserve(B, "patients", SECOND, records=overlap)
    message = str(info.value)
    assert f"already charged per image (dataset {A})" in message
    assert "group privacy" in message and "--privacy-unit image" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    with pytest.raises(ConfigError, match="per image"):  # check() says the same
        ledger.check(A, SECOND, records=patients(0, pids))
    # patient-level on other images is fine; then image-level on those is refused
    ledger.reserve(C, "patients", SECOND, records=patients(100, ["Z1", "Z2"]))
    with pytest.raises(ConfigError, match="--privacy-unit patient"):
        ledger.reserve(D, "images", TINY, records=images(100, 2))
    with pytest.raises(ConfigError, match="--privacy-unit patient"):
        ledger.reserve(C, "no-records", TINY)  # a caller without records: per image
    assert [e["run_id"] for e in ledger.entries()] == ["images", "patients"]


def test_check_registers_only_what_fits(ledger):
    old = images(0, 10)
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=old)
    _spend(ledger, A, "first", FIRST, old)
    ledger.check(B, TINY, records=images(5, 10))  # fits: B's records are registered
    assert ledger.spent(B) == pytest.approx(eps(FIRST))
    with pytest.raises(BudgetExceededError, match=r"^Refused for site-1: with this run, 5 "):
        ledger.check(C, SECOND, verb="Refused for site-1", records=images(5, 10))
    assert ledger.spent(C) == 0.0  # refused: nothing registered
    assert ledger.entries() == ledger.entries(A)


def test_progress_beyond_the_plan_stops_the_run_per_record(ledger):
    old = images(0, 10)
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=old)
    _spend(ledger, A, "first", FIRST, old)
    ledger.reserve(B, "second", TINY, records=images(0, 5))
    with pytest.raises(BudgetExceededError, match=r"^Stop: with this run, all 5 images"):
        ledger.update("second", [(20.0, 0.05, 10), (3.0, 0.05, 200)])
    assert ledger.spent(A) == pytest.approx(eps(FIRST + TINY + SECOND))
    assert ledger.remaining(A) == 0.0


def test_a_resumed_run_is_not_charged_twice(ledger):
    records = images(0, 10)
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=records)
    ledger.reserve(A, "run", FIRST, records=records)
    again = ledger.reserve(A, "run", FIRST, records=records)
    assert again.resumed and again.unit == "image"
    ledger.reserve(A, "run", FIRST + TINY, records=records)  # grows, still fits
    with pytest.raises(BudgetExceededError):
        ledger.reserve(A, "run", FIRST + SECOND, records=records)
    assert ledger.spent(A) == pytest.approx(eps(FIRST + TINY))


def test_one_file_holds_the_same_run_id_for_several_sites(tmp_path):
    """A folder's ledger serves every site of a local job: each node's handle commits
    its own reservation of the job's run id, not another site's."""
    path = tmp_path / "ledger.sqlite"
    site1, site2 = BudgetLedger(path), BudgetLedger(path)
    site1.reserve(A, "job-round-1", FIRST, records=images(0, 10))
    site2.reserve(B, "job-round-1", SECOND, records=images(100, 10))
    site1.commit("job-round-1", [(1.4, 0.05, 150)])
    site2.release("job-round-1")
    status = {e["dataset_id"]: (e["status"], e["steps"]) for e in site1.entries()}
    assert status == {A: ("committed", 150), B: ("released", 0)}


def test_many_records_are_grouped_not_composed_one_by_one(ledger):
    n = 100_000
    everything = images(0, n)
    ledger.set_budget(A, 3.0, DELTA, "rdp", records=everything)
    _spend(ledger, A, "all", FIRST, everything)
    _spend(ledger, B, "half", TINY, images(0, n // 2))
    request = images(n // 4, 3 * n // 4 + 10)  # a quarter in A and B, a half in A only
    start = time.perf_counter()
    groups = ledger.record_groups(C, records=request)
    assert [(g["datasets"], g["records"]) for g in groups] == [
        ([A, B], n // 4), ([A], n // 2), ([], 10)]
    assert groups[0]["epsilon"] == pytest.approx(eps(FIRST + TINY))
    with pytest.raises(BudgetExceededError, match=f"{3 * n // 4} of the {3 * n // 4 + 10} "
                       "images"):
        ledger.reserve(C, "c", SECOND, records=request)
    assert time.perf_counter() - start < 60  # seconds on a loaded machine, not minutes
