"""The whole linkage demonstration on a synthetic town (``privmed linkage-demo``).

1. A hospital drops names and MRNs and releases the rest: linking birth date, postcode
   and sex to the town's voter list re-identifies nearly every patient (Sweeney 2002).
2. Mondrian k-anonymous releases (with and without distinct l-diversity): no row is
   re-identified any more, but diagnoses still leak (homogeneity, better-than-base-rate
   guesses, the belief that an HIV-positive patient is HIV-positive).
3. Two k-anonymous releases of the same patients (a second study releasing birth
   date, postcode and sex only) composed: more diagnoses become certain.
4. DP statistics instead: a differencing attack on diagnosis counts is always right on
   exact counts and near chance on OpenDP Gaussian counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd

from privmed.errors import ConfigError
from privmed.tabular.hierarchy import QuasiIdentifier
from privmed.tabular.linkage import (
    attack_figures,
    composition_figures,
    differencing_attack,
    link,
)
from privmed.tabular.mondrian import anonymize
from privmed.tabular.synthetic import DIAGNOSES, as_text, make_cohort

QUASI = (QuasiIdentifier("age", "numeric"), QuasiIdentifier("birth_date", "date"),
         QuasiIdentifier("postcode", "postcode"), QuasiIdentifier("sex", "categorical"))
#: What the second study releases (its own k-anonymous table, without age).
SECOND_QUASI = QUASI[1:]
IDENTIFIERS = ("name", "mrn")
SENSITIVE = "diagnosis"
WATCH = "HIV"


def linkage_demo(patients: int = 2000, population: int = 20000, ks: Sequence[int] = (2, 5),
                 l: int = 2, epsilon: float = 1.0, delta: float = 1e-6,  # noqa: E741
                 targets: int = 200, seed: int = 0) -> dict:
    """Run the demonstration; returns its figures (JSON-ready, fractions in [0, 1]).

    ``releases``: per release the attack figures of :func:`attack_figures` (every
    patient a target, the voter list as auxiliary data); ``composition``: the two
    studies' releases at ``ks[0]`` (plain, then both l-diverse); ``differencing``: see
    :func:`differencing_attack` (``targets`` patients, half of them HIV-positive).
    """
    if not ks or min(ks) < 2:
        raise ConfigError("Give the k values to try, each at least 2.")
    start = time.perf_counter()
    cohort = make_cohort(patients, population, seed)
    table = as_text(cohort.patients)
    truth = cohort.patients[SENSITIVE].to_numpy()
    domain = sorted(DIAGNOSES)
    baseline = cohort.patients[SENSITIVE].value_counts().idxmax()
    voters, rows = cohort.voters, cohort.voter_rows

    def attack(release: pd.DataFrame, quasi: Sequence[QuasiIdentifier] = QUASI) -> dict:
        return attack_figures(link(release, voters, quasi, SENSITIVE, domain), rows, truth,
                              baseline, WATCH)

    releases = {"names dropped": attack(table.drop(columns=list(IDENTIFIERS)))}
    reports = {}
    for k in ks:
        for div in (None, l):
            name = f"k={k}" + (f", l={div}" if div else "")
            result = anonymize(table, QUASI, k, sensitive=SENSITIVE, l=div,
                               drop=IDENTIFIERS)
            releases[name] = attack(result.table)
            reports[name] = {key: result.report[key] for key in (
                "k_achieved", "l_achieved", "equivalence_classes", "ncp_overall")}
    k0 = ks[0]
    composition = {}
    for div in (None, l):
        first = anonymize(table, QUASI, k0, sensitive=SENSITIVE, l=div, drop=IDENTIFIERS)
        second = anonymize(table, SECOND_QUASI, k0, sensitive=SENSITIVE, l=div,
                           drop=(*IDENTIFIERS, "age"))
        name = f"k={k0}" + (f", l={div}" if div else "") + " with a second study"
        composition[name] = composition_figures(
            link(first.table, voters, QUASI, SENSITIVE, domain),
            link(second.table, voters, SECOND_QUASI, SENSITIVE, domain), rows)
    differencing = differencing_attack(
        table, [q.name for q in SECOND_QUASI], SENSITIVE, WATCH, DIAGNOSES, targets=targets,
        epsilon=epsilon, delta=delta, seed=seed)
    return {
        "patients": patients, "population": population, "seed": seed,
        "quasi_identifiers": [q.name for q in QUASI],
        "auxiliary": "voter list: name, birth date, age, sex, postcode of the whole town",
        "watch": WATCH, "releases": releases, "anonymization": reports,
        "composition": composition, "differencing": differencing,
        "seconds": time.perf_counter() - start,
    }
