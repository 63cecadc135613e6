"""Linkage attacks: why k-anonymity is not enough, and what DP statistics do instead.

An attacker holds auxiliary data with names and quasi-identifiers (a voter list:
name, birth date, sex, postcode; Sweeney 2002) and a released table. A person is
*compatible* with a released row when each of their QI values lies in the row's
released (generalised) value. For each person this counts the compatible rows and
the sensitive values among them:

* **re-identification**: exactly one compatible row, compatible with nobody else in
  the auxiliary data: the row is theirs (raw tables with names dropped; never under
  k-anonymity on the same QIs, where every class has >= k rows).
* **homogeneity** (Machanavajjhala et al. 2007): all compatible rows share one sensitive
  value, learnt with certainty without finding the row; distinct l-diversity (l >= 2)
  prevents it, but the most frequent value in the class is still a better guess than
  the table's most frequent value (background knowledge narrows further).
* **composition** (Ganta et al. 2008): two releases of the same patients, each
  k-anonymous and l-diverse, intersected: the values compatible in both.

Against DP statistics there are no rows to link; the classic attack is *differencing*:
ask a count with and without the target (a filter that excludes them) and subtract.
Exact counts give the answer every time; Gaussian noise makes the guess near chance,
and (epsilon, delta)-DP bounds its accuracy whatever the attacker does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from privmed.errors import ConfigError
from privmed.privacy.accounting import compute_epsilon
from privmed.tabular.dpstats import HistogramQuery, plan_stats
from privmed.tabular.hierarchy import QuasiIdentifier, covers, parse_released, to_codes
from privmed.tabular.table import date_values, numeric_values, require_columns


@dataclass
class Linkage:
    """Per auxiliary person (row of the auxiliary table) what a release reveals."""

    domain: np.ndarray  # the sensitive values, sorted
    candidates: np.ndarray  # compatible released rows per person
    counts: np.ndarray  # persons x domain: compatible rows holding each sensitive value
    last_class: np.ndarray  # a compatible class per person (-1: none)
    class_people: np.ndarray  # per released class: compatible auxiliary persons


def _aux_codes(aux: pd.DataFrame, q: QuasiIdentifier) -> np.ndarray:
    """The auxiliary column, validated, in the codes :func:`covers` compares."""
    readers = {"numeric": numeric_values, "date": date_values}
    read = readers.get(q.kind)
    values = read(aux, q.name, "the auxiliary table") if read else aux[q.name]
    return to_codes(values, q.kind)


def link(release: pd.DataFrame, aux: pd.DataFrame, quasi: Sequence[QuasiIdentifier],
         sensitive: str, domain: Sequence[str] | None = None) -> Linkage:
    """Match every person of ``aux`` to the compatible rows of ``release`` (kinds needed)."""
    quasi = list(quasi)
    if any(q.kind is None for q in quasi):
        raise ConfigError("A linkage attack needs the kind of every quasi-identifier.")
    names = [q.name for q in quasi]
    require_columns(release, [*names, sensitive], "the release")
    require_columns(aux, names, "the auxiliary table")
    dom = np.array(sorted(set(release[sensitive].astype(str)) if domain is None
                          else domain), dtype=object)
    sens = pd.Categorical(release[sensitive].astype(str), categories=dom).codes
    if (sens < 0).any():
        raise ConfigError("The release has sensitive values outside the given domain.")
    keys = release[names].astype(str)
    cls, uniques = pd.factorize(pd.MultiIndex.from_frame(keys))
    n_cls = len(uniques)
    class_counts = np.zeros((n_cls, len(dom)), dtype=np.int64)
    np.add.at(class_counts, (cls, sens), 1)
    # String kinds: compare each released value with the auxiliary table's distinct values.
    prepared = []
    for q in quasi:
        codes = _aux_codes(aux, q)
        if q.kind in ("numeric", "date"):
            prepared.append((q, codes, None, {}))
        else:
            values, inverse = np.unique(codes, return_inverse=True)
            prepared.append((q, values, inverse, {}))
    people = len(aux)
    candidates = np.zeros(people, dtype=np.int64)
    counts = np.zeros((people, len(dom)), dtype=np.int64)
    last = np.full(people, -1, dtype=np.int64)
    class_people = np.zeros(n_cls, dtype=np.int64)
    for c, tup in enumerate(uniques):
        mask = np.ones(people, dtype=bool)
        for (q, values, inverse, cache), text in zip(prepared, tup, strict=True):
            if inverse is None:
                mask &= covers(parse_released(text, q.kind), values)
            else:
                if text not in cache:
                    cache[text] = covers(parse_released(text, q.kind), values)
                mask &= cache[text][inverse]
            if not mask.any():
                break
        idx = np.flatnonzero(mask)
        class_people[c] = idx.size
        if idx.size:
            candidates[idx] += class_counts[c].sum()
            counts[idx] += class_counts[c]
            last[idx] = c
    return Linkage(dom, candidates, counts, last, class_people)


def attack_figures(linkage: Linkage, targets: np.ndarray, truth: Sequence[str],
                   baseline: str, watch: str | None = None) -> dict:
    """What the attacker learns about ``targets`` (aux row indices; their true sensitive
    values ``truth``); ``baseline``: the guess without the release (its most common value).

    ``watch``: a sensitive value (e.g. "HIV") whose holders' exposure is measured: the
    attacker's belief that they hold it (its share of their compatible rows), against
    its share of the release (the belief without linking).
    """
    targets = np.asarray(targets, dtype=np.int64)
    truth = np.asarray(truth, dtype=object)
    cand = linkage.candidates[targets]
    if (cand == 0).any():
        raise ConfigError("A target is compatible with no released row: the auxiliary data "
                          "does not match the release's quasi-identifiers.")
    cls = linkage.last_class[targets]
    unique = (cand == 1) & (linkage.class_people[cls] == 1)
    counts = linkage.counts[targets]
    certain = (counts > 0).sum(axis=1) == 1
    guess = linkage.domain[np.argmax(counts, axis=1)]
    out = {
        "targets": len(targets),
        "uniquely_reidentified": int(unique.sum()),
        "reidentified_fraction": float(unique.mean()),
        "min_candidates": int(cand.min()),
        "median_candidates": float(np.median(cand)),
        "value_certain": int(certain.sum()),
        "value_certain_fraction": float(certain.mean()),
        "best_guess_accuracy": float((guess == truth).mean()),
        "baseline_accuracy": float((truth == baseline).mean()),
    }
    if watch is not None:
        col = list(linkage.domain).index(watch)
        holders = truth == watch
        belief = counts[holders, col] / cand[holders]
        out.update({"watch": watch, "watch_holders": int(holders.sum()),
                    "watch_prior": float(holders.mean()),
                    "watch_belief_mean": float(belief.mean()) if belief.size else 0.0,
                    "watch_belief_at_least_half": float((belief >= 0.5).mean())
                    if belief.size else 0.0})
    return out


def composition_figures(first: Linkage, second: Linkage, targets: np.ndarray) -> dict:
    """Values compatible in both releases: how many targets are left with only one."""
    if list(first.domain) != list(second.domain):
        raise ConfigError("Compose linkages over the same sensitive domain.")
    both = (first.counts[targets] > 0) & (second.counts[targets] > 0)
    single = both.sum(axis=1) == 1
    return {"targets": len(targets), "value_certain": int(single.sum()),
            "value_certain_fraction": float(single.mean()),
            "mean_values_left": float(both.sum(axis=1).mean())}


def dp_accuracy_bound(epsilon: float, delta: float) -> float:
    """Highest accuracy of any guess between two neighbouring worlds, equally likely, under
    (epsilon, delta)-DP: ((1 - delta) tanh(epsilon / 2) + 1 + delta) / 2."""
    return ((1 - delta) * math.tanh(epsilon / 2) + 1 + delta) / 2


def differencing_attack(table: pd.DataFrame, quasi: Sequence[str], sensitive: str,
                        value: str, categories: Sequence[str], *, targets: int = 100,
                        epsilon: float = 1.0, delta: float = 1e-6,
                        seed: int = 0) -> dict:
    """Learn whether ``targets`` patients have ``value`` by differencing two histograms.

    Query 1: the histogram of ``sensitive`` over all rows; query 2: over the rows whose
    ``quasi`` values differ from the target's (targets have unique QI values, so the
    filter removes exactly them). Guess "has ``value``" when the ``value`` bin differs
    by more than 0.5. Half the targets have ``value``. Exact counts are then always
    right; with DP each pair of queries is one release at (epsilon, delta) (two
    Gaussian mechanisms, OpenDP), whose expected accuracy is Φ(1 / (2√2 σ)).
    """
    require_columns(table, [*quasi, sensitive], "the table")
    keys = pd.factorize(pd.MultiIndex.from_frame(table[list(quasi)].astype(str)))[0]
    unique_rows = np.flatnonzero(np.bincount(keys)[keys] == 1)
    sens = table[sensitive].astype(str).to_numpy()
    pos = unique_rows[sens[unique_rows] == value]
    neg = unique_rows[sens[unique_rows] != value]
    half = min(targets // 2, len(pos), len(neg))
    if half < 1:
        raise ConfigError(f"No patient with a unique quasi-identifier combination has "
                          f"{sensitive} '{value}' (or all do); pick another value.")
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(pos, half, replace=False),
                             rng.choice(neg, half, replace=False)])
    truth = np.concatenate([np.ones(half, bool), np.zeros(half, bool)])
    hist = HistogramQuery(sensitive, tuple(categories))
    plan = plan_stats(histograms=[hist, hist], epsilon=epsilon, delta=delta)
    bin_ = list(categories).index(value)
    column = sens.tolist()
    exact_right = dp_right = 0
    for row, has in zip(chosen, truth, strict=True):
        others = [s for s, key in zip(column, keys, strict=True) if key != keys[row]]
        exact = column.count(value) - others.count(value)
        exact_right += int((exact > 0.5) == has)
        noisy = (plan.mechanisms[0].measurement(column)[bin_]
                 - plan.mechanisms[1].measurement(others)[bin_])
        dp_right += int((noisy > 0.5) == has)
    sigma = plan.mechanisms[0].scale
    # The two worlds differ in the target's value: its row moves between two bins, an L2
    # change of sqrt(2) in query 1 (query 2 excludes it): one Gaussian of multiplier z/sqrt2.
    swap_eps = compute_epsilon([(plan.noise_multiplier / math.sqrt(2), 1.0, 1)], delta)
    n = 2 * half
    return {
        "targets": n, "value": value,
        "exact_accuracy": exact_right / n,
        "dp_accuracy": dp_right / n,
        "dp_expected_accuracy": 0.5 * (1 + math.erf(1 / (4 * sigma))),
        "dp_accuracy_bound": dp_accuracy_bound(swap_eps, delta),
        "noise_std": sigma, "epsilon": epsilon, "delta": delta,
        "release_epsilon": plan.achieved_epsilon, "swap_epsilon": swap_eps,
    }
