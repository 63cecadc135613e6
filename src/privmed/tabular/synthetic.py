"""A synthetic town and its hospital's patient table, for demonstrations and benchmarks.

Every person is fake: names are drawn from short lists of common first names and
surnames, birth dates uniformly over ages 18-90 on :data:`REFERENCE_DATE`,
postcodes (US-style five-digit ZIP codes in a few three-digit areas) with uneven
populations, and the patients' diagnoses depend on age band and sex the way
hospital case mixes roughly do. The *voter list* is the whole town with names,
birth date, sex and postcode: the auxiliary data of a linkage attack (Sweeney 2002).
Randomness: a seeded numpy Generator (it is fake data, not a secret).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd

from privmed.errors import ConfigError

REFERENCE_DATE = date(2024, 1, 1)
DIAGNOSES = ("asthma", "depression", "type 2 diabetes", "hypertension", "COPD",
             "heart failure", "breast cancer", "HIV")
_AREAS = ("021", "022", "024", "100", "101", "606", "941")
_FIRST_F = ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan",
            "Jessica", "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Sandra", "Margaret",
            "Ashley", "Kimberly", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Melissa",
            "Deborah", "Stephanie", "Rebecca", "Sharon", "Laura", "Cynthia", "Amy")
_FIRST_M = ("James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph",
            "Thomas", "Christopher", "Charles", "Daniel", "Matthew", "Anthony", "Mark",
            "Donald", "Steven", "Andrew", "Paul", "Joshua", "Kenneth", "Kevin", "Brian",
            "George", "Timothy", "Ronald", "Jason", "Edward", "Jeffrey", "Ryan")
_SURNAMES = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
             "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
             "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson",
             "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker",
             "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores",
             "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell",
             "Carter", "Roberts")
#: Relative weights of DIAGNOSES per age band (<35, 35-54, 55-69, 70+).
_CASE_MIX = np.array([
    [45, 30, 4, 4, 1, 1, 2, 13],
    [14, 26, 20, 22, 4, 3, 6, 5],
    [5, 10, 26, 32, 10, 9, 6, 2],
    [3, 6, 18, 33, 15, 22, 3, 0.5],
])
_BREAST_CANCER = DIAGNOSES.index("breast cancer")


def _ages(birth: np.ndarray) -> np.ndarray:
    ref = pd.Timestamp(REFERENCE_DATE)
    b = pd.DatetimeIndex(birth)
    before = (b.month > ref.month) | ((b.month == ref.month) & (b.day > ref.day))
    return (ref.year - b.year - before.astype(int)).to_numpy()


def make_population(size: int = 20000, seed: int = 0) -> pd.DataFrame:
    """The town: ``name, birth_date, age, sex, postcode`` for ``size`` fake people."""
    if size < 1:
        raise ConfigError(f"A population needs at least one person, got {size}.")
    rng = np.random.default_rng(seed)
    zips = np.array([f"{a}{s:02d}" for a in _AREAS for s in range(1, 10)])
    share = rng.dirichlet(np.full(len(zips), 2.0))
    sex = rng.choice(np.array(["F", "M"]), size=size)
    first = np.where(sex == "F", rng.choice(np.array(_FIRST_F), size=size),
                     rng.choice(np.array(_FIRST_M), size=size))
    names = np.char.add(np.char.add(first, " "), rng.choice(np.array(_SURNAMES), size=size))
    ref = np.datetime64(REFERENCE_DATE.isoformat(), "D")
    birth = ref - rng.integers(18 * 365 + 5, 90 * 365, size=size).astype("timedelta64[D]")
    return pd.DataFrame({
        "name": names, "birth_date": np.datetime_as_string(birth, unit="D"),
        "age": _ages(birth), "sex": sex, "postcode": rng.choice(zips, size=size, p=share)})


def _sample(population: pd.DataFrame, size: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    if not 1 <= size <= len(population):
        raise ConfigError(f"The patient table needs 1 to {len(population)} rows (the "
                          f"population), got {size}.")
    rng = np.random.default_rng(seed + 1)
    chosen = np.sort(rng.choice(len(population), size=size, replace=False))
    rows = population.iloc[chosen]
    band = np.digitize(rows["age"].to_numpy(), [35, 55, 70])
    weights = _CASE_MIX[band].copy()
    weights[rows["sex"].to_numpy() == "M", _BREAST_CANCER] *= 0.02
    weights /= weights.sum(axis=1, keepdims=True)
    u = rng.random(size)[:, None]
    diagnosis = np.array(DIAGNOSES)[(u > np.cumsum(weights, axis=1)).sum(axis=1)]
    mrn = np.char.add("MRN", np.char.zfill(rng.permutation(10 ** 6)[:size].astype(str), 6))
    table = rows.reset_index(drop=True).assign(mrn=mrn, diagnosis=diagnosis)
    return table[["mrn", "name", "birth_date", "age", "sex", "postcode", "diagnosis"]], chosen


def make_patients(population: pd.DataFrame, size: int = 2000, seed: int = 0) -> pd.DataFrame:
    """A hospital's table: ``size`` people of ``population`` with an MRN and a diagnosis."""
    return _sample(population, size, seed)[0]


@dataclass
class Cohort:
    """A patient table, the town's voter list, and (hidden from any attacker) which
    voter each patient row is: ``voters.iloc[voter_rows[i]]`` is patient ``i``."""

    patients: pd.DataFrame
    voters: pd.DataFrame
    voter_rows: np.ndarray


def make_cohort(patients: int = 2000, population: int = 20000, seed: int = 0) -> Cohort:
    """A town of ``population`` people and ``patients`` of them in the hospital's table."""
    town = make_population(population, seed)
    table, rows = _sample(town, patients, seed)
    return Cohort(table, town[["name", "birth_date", "age", "sex", "postcode"]], rows)


def as_text(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text, the form :func:`privmed.tabular.table.read_table` gives."""
    return df.astype(str)
