"""``privmed anonymize | dp-stats | linkage-demo``: tabular patient data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from privmed.cli.app import app, console


def _names(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated column names, in order, without blanks."""
    out: list[str] = []
    for value in values or []:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_anonymization(report: dict) -> None:
    table = Table(title=f"k-anonymous release (k = {report['k_requested']}"
                  + (f", l = {report['l_requested']}" if report["l_requested"] else "") + ")")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("rows in / released / suppressed", f"{report['rows']} / {report['released_rows']} / "
         f"{report['suppressed_rows']}"),
        ("equivalence classes", str(report["equivalence_classes"])),
        (f"achieved k ({report['checked_with']})", str(report["k_achieved"])),
        (f"achieved l ({report['checked_with']})",
         "-" if report["l_achieved"] is None else str(report["l_achieved"])),
        ("discernibility", f"{report['discernibility']:,}"),
        ("normalised average class size", _f(report["normalized_average_class_size"])),
    ]
    rows += [(f"NCP {name}", _f(v)) for name, v in report["ncp"].items()]
    rows.append(("NCP overall", _f(report["ncp_overall"])))
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command("anonymize")
def anonymize_cmd(
    table: Annotated[Path, typer.Argument(help="The patient table (CSV with a header).")],
    k: Annotated[int, typer.Option("--k", "-k", help="Every row shares its released "
                                   "quasi-identifiers with at least k - 1 others.")],
    quasi: Annotated[str, typer.Option(
        "--quasi", help="Quasi-identifiers as NAME[:KIND],... with KIND numeric, date "
        "(YYYY-MM-DD), postcode or categorical (inferred when left out).")],
    sensitive: Annotated[str | None, typer.Option(
        "--sensitive", help="The sensitive column (released as is; l-diversity is on it).")
    ] = None,
    l: Annotated[int | None, typer.Option(  # noqa: E741
        "--l", "-l", help="Distinct sensitive values every class must hold.")] = None,
    drop: Annotated[list[str] | None, typer.Option(
        "--drop", help="Columns to leave out (direct identifiers: name, MRN...).")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="Columns to release unchanged, deliberately.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Released CSV (default: TABLE.k<k>.csv beside the table).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the report as JSON.")
                      ] = None,
) -> None:
    """k-anonymise a table with Mondrian (and l-diversify it); report the information lost."""
    from privmed.tabular.release import anonymize_table

    out = out or table.with_name(f"{table.stem}.k{k}.csv")
    result = anonymize_table(table, k, quasi, sensitive=sensitive, l=l, drop=_names(drop),
                             keep=_names(keep), out=out, report=report)
    print_anonymization(result.report)
    console.print(f"Wrote [bold]{out}[/]" + (f" and {report}" if report else "") + ".")


def print_stats(release: dict) -> None:
    table = Table(title=f"DP statistics (ε = {release['epsilon']:g}, δ = "
                  f"{release['delta']:g})")
    for col in ("statistic", "column", "value", "noise std"):
        table.add_column(col, justify="left" if col in ("statistic", "column") else "right")
    for s in release["statistics"]:
        if s["statistic"] == "histogram":
            for cat, count in s["counts"].items():
                table.add_row(f"count of {cat}", s["column"], str(count), _f(s["noise_std"], ".2f"))
            table.add_row("count of other values", s["column"], str(s["other"]),
                          _f(s["noise_std"], ".2f"))
        elif s["statistic"] == "mean":
            table.add_row(f"mean in [{s['lower']:g}, {s['upper']:g}]", s["column"],
                          _f(s["value"], ".4g"), f"{_f(s['noise_std'], '.4g')} (sum)")
        else:
            table.add_row("rows", "", str(s["value"]), _f(s["noise_std"], ".2f"))
    console.print(table)
    n = release["history"][0]["steps"]
    console.print(f"{n} Gaussian mechanism{'s' if n > 1 else ''} (OpenDP), noise "
                  f"multiplier {release['noise_multiplier']:.3f}: ε = "
                  f"{release['achieved_epsilon']:.3f} with the {release['accountant'].upper()} "
                  f"accountant (OpenDP's zCDP bound: ρ = {release['opendp']['rho']:.4g}, "
                  f"ε ≤ {release['opendp']['epsilon']:.3f}). Unit of privacy: "
                  f"{release['unit_of_privacy']}.")
    if release.get("note"):  # per row: say in one line what that leaves a patient
        console.print(f"[yellow]{release['note']}[/]")
    led = release["ledger"]
    if led is None:
        console.print("[yellow]No ledger: nothing was charged; give --ledger FILE to keep "
                      "count of the privacy spent on this table.[/]")
        return
    left = ("" if led["remaining_epsilon"] is None else
            f", {led['remaining_epsilon']:.3f} of the budget {led['budget_epsilon']:g} left")
    console.print(f"Ledger {led['path']}: charged ε {led['charged_epsilon']:.3f} per "
                  f"{led.get('unit', 'row')} to dataset "
                  f"{led['dataset_id']} as run {led['run_id']} (ε {led['spent_epsilon']:.3f} "
                  f"spent in all{left}).")


@app.command("dp-stats")
def dp_stats_cmd(
    table: Annotated[Path, typer.Argument(help="The patient table (CSV with a header).")],
    count: Annotated[bool, typer.Option("--count", help="The number of rows.")] = False,
    histogram: Annotated[list[str] | None, typer.Option(
        "--histogram", help="Counts per category of a column (repeat; declare the "
        "categories with --categories).")] = None,
    categories: Annotated[list[str] | None, typer.Option(
        "--categories", help="Public categories of a histogram column: COLUMN=a,b,c.")] = None,
    mean: Annotated[list[str] | None, typer.Option(
        "--mean", help="Mean of a numeric column clamped to public bounds: "
        "COLUMN:LOWER:UPPER (repeat).")] = None,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Epsilon of the whole release.")
                       ] = 1.0,
    delta: Annotated[float, typer.Option("--delta", help="Delta of the whole release.")
                     ] = 1e-6,
    patient_column: Annotated[str | None, typer.Option(
        "--patient-column", help="Patient id column: the patient becomes the unit of "
        "privacy.")] = None,
    max_rows_per_patient: Annotated[int, typer.Option(
        "--max-rows-per-patient", help="With --patient-column: keep each patient's first K "
        "rows (table order); the noise covers K rows per patient.")] = 1,
    ledger: Annotated[Path | None, typer.Option(
        "--ledger", help="SQLite budget ledger to charge (the one training uses).")] = None,
    dataset_id: Annotated[str | None, typer.Option(
        "--dataset-id", help="Charge this dataset id (16 hex) instead of the table's hash.")
    ] = None,
    budget_epsilon: Annotated[float | None, typer.Option(
        "--budget-epsilon", help="Give the dataset this total budget in the ledger.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the release as JSON.")
                   ] = None,
) -> None:
    """Counts, histograms and means under (ε, δ)-DP with OpenDP, charged to the ledger."""
    from privmed.tabular.dpstats import histogram_queries, parse_categories, parse_mean
    from privmed.tabular.release import dp_table_stats

    hists = histogram_queries(_names(histogram), parse_categories(categories or []))
    release = dp_table_stats(
        table, count=count, histograms=hists, means=[parse_mean(m) for m in mean or []],
        epsilon=epsilon, delta=delta, patient_column=patient_column,
        max_rows_per_patient=max_rows_per_patient, ledger=ledger, dataset_id=dataset_id,
        budget_epsilon=budget_epsilon, out=out)
    print_stats(release)
    if out is not None:
        console.print(f"Wrote [bold]{out}[/].")


def print_linkage_demo(result: dict) -> None:
    """The demonstration's figures as three tables."""
    watch = result["watch"]
    table = Table(title=f"Linking {result['patients']} patients to a voter list of "
                  f"{result['population']} on {', '.join(result['quasi_identifiers'])}")
    for col in ("release", "re-identified", "median candidates", "diagnosis certain",
                "best guess right", f"belief {watch}+ is {watch}+"):
        table.add_column(col, justify="left" if col == "release" else "right")
    any_release = next(iter(result["releases"].values()))
    table.add_row("[dim]no release (base rate)[/]", "-", "-", "-",
                  f"{any_release['baseline_accuracy']:.1%}", f"{any_release['watch_prior']:.1%}")
    for name, r in result["releases"].items():
        table.add_row(name, f"{r['reidentified_fraction']:.1%}", f"{r['median_candidates']:g}",
                      f"{r['value_certain_fraction']:.1%}", f"{r['best_guess_accuracy']:.1%}",
                      f"{r['watch_belief_mean']:.1%}")
    console.print(table)
    comp = Table(title="Composing two k-anonymous releases (a second study: birth date, "
                 "postcode, sex)")
    comp.add_column("releases")
    comp.add_column("diagnosis certain", justify="right")
    comp.add_column("values left (mean)", justify="right")
    for name, c in result["composition"].items():
        comp.add_row(name, f"{c['value_certain_fraction']:.1%}", f"{c['mean_values_left']:.2f}")
    console.print(comp)
    d = result["differencing"]
    diff = Table(title=f"Differencing attack: does a patient have {d['value']}? "
                 f"({d['targets']} patients, half of them do)")
    diff.add_column("counts released")
    diff.add_column("attack accuracy", justify="right")
    diff.add_row("exact", f"{d['exact_accuracy']:.1%}")
    diff.add_row(f"DP (OpenDP Gaussian, ε = {d['epsilon']:g}, δ = {d['delta']:g}, σ = "
                 f"{d['noise_std']:.2f})", f"{d['dp_accuracy']:.1%}")
    diff.add_row("[dim]DP, expected / guaranteed at most[/]",
                 f"[dim]{d['dp_expected_accuracy']:.1%} / {d['dp_accuracy_bound']:.1%}[/]")
    console.print(diff)


@app.command("linkage-demo")
def linkage_demo_cmd(
    patients: Annotated[int, typer.Option("--patients", help="Rows of the patient table.")
                        ] = 2000,
    population: Annotated[int, typer.Option("--population", help="People on the voter list.")
                          ] = 20000,
    k: Annotated[list[int] | None, typer.Option("--k", "-k", help="k values (repeat).")
                 ] = None,
    l: Annotated[int, typer.Option("--l", "-l", help="l of the l-diverse releases.")  # noqa: E741
                 ] = 2,
    epsilon: Annotated[float, typer.Option("--epsilon", help="ε of each differencing "
                                           "release.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Write the figures as JSON.")
                   ] = None,
) -> None:
    """Why k-anonymity is not enough: linkage attacks on a synthetic town, and DP instead."""
    from privmed.tabular.linkage_demo import linkage_demo
    from privmed.tabular.table import write_json_atomic

    result = linkage_demo(patients=patients, population=population, ks=tuple(k or (2, 5)),
                          l=l, epsilon=epsilon, seed=seed)
    print_linkage_demo(result)
    if out is not None:
        write_json_atomic(result, out)
        console.print(f"Wrote [bold]{out}[/].")


def demo_tabular(out: Path, ledger: Path) -> dict:
    """Demo step: a synthetic patient table k-anonymised and l-diversified, DP statistics
    of it charged to the demo's ledger, then the linkage demonstration (about 5 s)."""
    from privmed.tabular.dpstats import HistogramQuery, MeanQuery, dp_stats
    from privmed.tabular.linkage_demo import IDENTIFIERS, QUASI, SENSITIVE, linkage_demo
    from privmed.tabular.mondrian import anonymize
    from privmed.tabular.synthetic import DIAGNOSES, as_text, make_cohort
    from privmed.tabular.table import table_id, write_csv_atomic
    from privmed.training.run import open_ledger

    out.mkdir(parents=True, exist_ok=True)
    table = as_text(make_cohort(2000, 20000, seed=0).patients)
    write_csv_atomic(table, out / "patients.csv")
    console.print(f"A patient table of {len(table)} rows ({', '.join(table.columns)}) in "
                  f"{out / 'patients.csv'}:")
    released = anonymize(table, QUASI, 5, sensitive=SENSITIVE, l=2, drop=IDENTIFIERS)
    write_csv_atomic(released.table, out / "patients.k5.csv")
    print_anonymization(released.report)
    dataset_id = table_id(table)
    book = open_ledger(ledger, dataset_id, 2.0, 1e-6)
    release = dp_stats(table, count=True, histograms=[HistogramQuery(SENSITIVE, DIAGNOSES)],
                       means=[MeanQuery("age", 0, 100)], epsilon=1.0, delta=1e-6,
                       ledger=book, dataset_id=dataset_id)
    print_stats(release)
    result = linkage_demo()
    print_linkage_demo(result)
    return {"k_achieved": released.report["k_achieved"],
            "l_achieved": released.report["l_achieved"],
            "ncp": released.report["ncp_overall"], "dp_epsilon": release["achieved_epsilon"],
            "linkage": result}
