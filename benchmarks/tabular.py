"""Tabular privacy: Mondrian k-anonymity cost, DP-statistics error, linkage attacks.

    .venv/bin/python benchmarks/tabular.py                     # 10k and 100k rows, ~3 min
    .venv/bin/python benchmarks/tabular.py --sizes 10000 --json tabular.json

On synthetic patient tables (``privmed.tabular.synthetic``: patients drawn from a town
ten times larger, or four times for 100k rows) with quasi-identifiers age, birth date,
postcode and sex and the diagnosis as sensitive column:

1. Mondrian for k in (2, 5, 10, 25), without and with distinct l = 2: partitioning and
   generalisation time, the pycanon check's time, achieved k / l, equivalence classes,
   NCP (overall and per QI) and the discernibility metric.
2. ``dp-stats`` (OpenDP, Gaussian, delta 1e-6): relative error of the row count, of the
   mean age (bounds 18-90) and of the diagnosis histogram (mean over its categories of
   |noisy - true| / true), averaged over ``--repeats`` releases, at epsilon 0.1, 1, 10.
3. Linkage (``linkage_demo`` on the first size): re-identification and diagnosis
   inference on the release with names dropped, k-anonymous and l-diverse releases,
   and the differencing attack on exact vs DP counts.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import numpy as np

KS = (2, 5, 10, 25)
EPSILONS = (0.1, 1.0, 10.0)


def _table(n: int, seed: int) -> Any:
    from privmed.tabular.synthetic import as_text, make_cohort

    return as_text(make_cohort(n, n * (10 if n <= 20000 else 4), seed).patients)


def mondrian(n: int, seed: int) -> list[dict]:
    from privmed.tabular.hierarchy import parse_quasi
    from privmed.tabular.mondrian import anonymize
    from privmed.tabular.report import pycanon_k_l

    table = _table(n, seed)
    quasi = parse_quasi("age:numeric,birth_date:date,postcode:postcode,sex:categorical")
    rows = []
    for k in KS:
        for l_div in (None, 2):
            start = time.perf_counter()
            res = anonymize(table, quasi, k, sensitive="diagnosis", l=l_div,
                            drop=["name", "mrn"], check=False)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            k_got, l_got = pycanon_k_l(res.table, [q.name for q in quasi], "diagnosis")
            check = time.perf_counter() - start
            r = res.report
            rows.append({"rows": n, "k": k, "l": l_div, "seconds": seconds,
                         "pycanon_seconds": check, "k_achieved": k_got, "l_achieved": l_got,
                         "classes": r["equivalence_classes"], "ncp": r["ncp_overall"],
                         "ncp_per_qi": r["ncp"], "discernibility": r["discernibility"]})
    return rows


def dp_error(n: int, seed: int, repeats: int) -> list[dict]:
    from privmed.tabular.dpstats import HistogramQuery, MeanQuery, plan_stats, run_plan
    from privmed.tabular.synthetic import DIAGNOSES

    table = _table(n, seed)
    true_count = len(table)
    true_mean = float(table["age"].astype(float).clip(18, 90).mean())
    true_hist = table["diagnosis"].value_counts()
    rows = []
    for eps in EPSILONS:
        plan = plan_stats(count=True, histograms=[HistogramQuery("diagnosis", DIAGNOSES)],
                          means=[MeanQuery("age", 18, 90)], epsilon=eps, delta=1e-6)
        errs: dict[str, list[float]] = {"count": [], "mean": [], "histogram": []}
        start = time.perf_counter()
        for _ in range(repeats):
            out = {s["statistic"]: s for s in run_plan(plan, table)}
            errs["count"].append(abs(out["count"]["value"] - true_count) / true_count)
            errs["mean"].append(abs(out["mean"]["value"] - true_mean) / true_mean)
            errs["histogram"].append(float(np.mean(
                [abs(v - true_hist[c]) / true_hist[c]
                 for c, v in out["histogram"]["counts"].items()])))
        rows.append({"rows": n, "epsilon": eps, "achieved_epsilon": plan.achieved_epsilon,
                     "noise_multiplier": plan.noise_multiplier,
                     "seconds_per_release": (time.perf_counter() - start) / repeats,
                     **{f"{k}_rel_error": float(np.mean(v)) for k, v in errs.items()}})
    return rows


def linkage(n: int, seed: int) -> dict:
    from privmed.tabular.linkage_demo import linkage_demo

    return linkage_demo(patients=n, population=10 * n, ks=(2, 5, 10), l=2, targets=400,
                        seed=seed)


def _print_tables(result: dict) -> None:
    print("\n## Mondrian (QIs age, birth date, postcode, sex; sensitive diagnosis)\n")
    print("| rows | k | l | time s | pycanon s | achieved k / l | classes | NCP | NCP age / "
          "birth / postcode / sex | discernibility |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in result["mondrian"]:
        per = " / ".join(f"{v:.3f}" for v in r["ncp_per_qi"].values())
        print(f"| {r['rows']} | {r['k']} | {r['l'] or '-'} | {r['seconds']:.2f} | "
              f"{r['pycanon_seconds']:.2f} | {r['k_achieved']} / {r['l_achieved']} | "
              f"{r['classes']} | {r['ncp']:.4f} | {per} | {r['discernibility']:,} |")
    print("\n## DP statistics (OpenDP Gaussian, delta 1e-6, one release = count + "
          "histogram + mean)\n")
    print("| rows | ε | ε (PRV) | noise multiplier | count rel. err | mean age rel. err | "
          "histogram rel. err | ms / release |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["dp_stats"]:
        print(f"| {r['rows']} | {r['epsilon']:g} | {r['achieved_epsilon']:.3f} | "
              f"{r['noise_multiplier']:.2f} | {r['count_rel_error']:.2e} | "
              f"{r['mean_rel_error']:.2e} | {r['histogram_rel_error']:.2e} | "
              f"{1000 * r['seconds_per_release']:.0f} |")
    lk = result["linkage"]
    print(f"\n## Linkage: {lk['patients']} patients, voter list of {lk['population']} "
          f"({lk['seconds']:.1f} s)\n")
    print("| release | re-identified | median candidates | diagnosis certain | best guess "
          "right | belief HIV+ is HIV+ |")
    print("|---|---:|---:|---:|---:|---:|")
    first = next(iter(lk["releases"].values()))
    print(f"| no release (base rate) | - | - | - | {first['baseline_accuracy']:.1%} | "
          f"{first['watch_prior']:.1%} |")
    for name, r in lk["releases"].items():
        print(f"| {name} | {r['reidentified_fraction']:.1%} | {r['median_candidates']:g} | "
              f"{r['value_certain_fraction']:.1%} | {r['best_guess_accuracy']:.1%} | "
              f"{r['watch_belief_mean']:.1%} |")
    for name, c in lk["composition"].items():
        print(f"| {name} (composed) | - | - | {c['value_certain_fraction']:.1%} | - | - |")
    d = lk["differencing"]
    print(f"\nDifferencing attack ({d['targets']} targets, half HIV+): exact counts "
          f"{d['exact_accuracy']:.1%}; DP counts (ε = {d['epsilon']:g}, σ = "
          f"{d['noise_std']:.2f}) {d['dp_accuracy']:.1%} (expected "
          f"{d['dp_expected_accuracy']:.1%}, DP bound {d['dp_accuracy_bound']:.1%}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--repeats", type=int, default=20, help="DP releases per epsilon.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    result: dict[str, Any] = {"mondrian": [], "dp_stats": []}
    for n in args.sizes:
        result["mondrian"] += mondrian(n, args.seed)
        result["dp_stats"] += dp_error(n, args.seed, args.repeats)
    result["linkage"] = linkage(args.sizes[0], args.seed)
    result["seconds"] = time.perf_counter() - start
    _print_tables(result)
    print(f"\nTotal {result['seconds']:.0f} s.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
