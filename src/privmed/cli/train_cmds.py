"""``privmed train | evaluate | report | models | demo``."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from privmed.cli.app import app, console

DataOpt = Annotated[str | None, typer.Option(
    "--data", help="Required: 'synthetic' (the embedded synthetic X-rays), a .npz file, an "
    "image or DICOM folder, or a fetched dataset name.")]
SizeOpt = Annotated[int | None, typer.Option("--size", help="Resize images to SIZE x SIZE.")]
CsvOpt = Annotated[Path | None, typer.Option("--labels-csv",
                                             help="CSV of file,label for DICOM folders.")]
PrivacyUnitOpt = Annotated[str, typer.Option(
    "--privacy-unit", help="What ε protects: 'patient' (all of a patient's images together), "
    "'image', or 'auto': patient whenever the data names the patients.")]


@app.command()
def train(
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")] = Path("runs/train"),
    model: Annotated[str | None, typer.Option(
        "--model", help="Registered model name (see 'privmed models') or a torch.save()d "
        "nn.Module file.")] = None,
    epsilon: Annotated[float | None, typer.Option(
        "--epsilon", help="Target epsilon (default 3).")] = None,
    delta: Annotated[float | None, typer.Option(
        "--delta", help="Target delta (default: largest power of ten <= 1/(10 N)).")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(
        "--noise-multiplier", help="Fix sigma instead of calibrating it to --epsilon.")] = None,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm")] = 1.0,
    accountant: Annotated[str, typer.Option("--accountant", help="prv or rdp.")] = "prv",
    privacy_unit: PrivacyUnitOpt = "auto",
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without privacy.")] = False,
    epochs: Annotated[int, typer.Option("--epochs")] = 30,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Expected batch size (Poisson sampling rate = B / N).")] = 1024,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-2,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    size: SizeOpt = None,
    labels_csv: CsvOpt = None,
    ledger: Annotated[Path | None, typer.Option(
        "--ledger", help="SQLite budget ledger to charge.")] = None,
    budget_epsilon: Annotated[float | None, typer.Option(
        "--budget-epsilon", help="Give the dataset this total budget in the ledger.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    positive_class: Annotated[str | None, typer.Option(
        "--positive-class", help="Binary tasks: the class that is the finding (default: the "
        "class named like one, e.g. 'pneumonia' against 'normal').")] = None,
    operating_point: Annotated[str | None, typer.Option(
        "--operating-point", help="Binary tasks: how the validation split chooses the "
        "threshold: 'youden' (default), 'sensitivity=0.95' or 'specificity=0.9'.")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="Binary tasks: a fixed threshold on the positive class's score "
        "instead of one chosen on the validation split.")] = None,
) -> None:
    """Train a classifier, with DP-SGD unless --no-dp."""
    from privmed.cli.external_eval import require_data
    from privmed.training.decision import parse_operating_point
    from privmed.training.train import train as train_data

    data = require_data(data, "train")
    spec = (parse_operating_point(operating_point, threshold)
            if operating_point is not None or threshold is not None else None)
    results = train_data(
        data, out, model=model, dp=not no_dp, epsilon=epsilon, delta=delta,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        accountant=accountant, privacy_unit=privacy_unit, ledger=ledger,
        budget_epsilon=budget_epsilon, size=size, labels_csv=labels_csv,
        positive_class=positive_class, operating_point=spec, progress=True,
        say=lambda line: console.print(line, highlight=False),
        command=shlex.join(["privmed", *sys.argv[1:]]),
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, resume=resume)
    print_summary(results, out)


def print_summary(results: dict, out: Path) -> None:
    from privmed.cli.metrics_view import operating_point_line, print_metrics

    print_metrics(console, results["metrics"], classes=results["data"]["classes"])
    line = operating_point_line(results.get("operating_point"))
    if line:
        console.print(line)
    p = results["privacy"]
    if p["enabled"]:
        from privmed.training.privacy_notes import privacy_unit_lines

        console.print(f"Privacy: (ε = {p['epsilon']:.3f}, δ = {p['delta']:g}) with the "
                      f"{p['accountant'].upper()} accountant, σ = {p['noise_multiplier']:.3f}, "
                      f"clipping norm {p['max_grad_norm']:g}.")
        for line in privacy_unit_lines(p):
            console.print(line, highlight=False)
        if p.get("ledger") and p["ledger"].get("remaining_epsilon") is not None:
            led = p["ledger"]
            console.print(f"Ledger: ε {led['spent_epsilon']:.3f} of {led['budget_epsilon']:g} "
                          f"spent on dataset {led['dataset_id']}, "
                          f"{led['remaining_epsilon']:.3f} left.")
    else:
        console.print("[yellow]No differential privacy: this model may memorise its training "
                      "images.[/]")
    console.print(f"Wrote {out / 'results.json'}, {out / 'model.pt'} and "
                  f"[bold]{out / 'report.html'}[/]")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder or model.pt file.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test: the split of "
                                       "--data to use when it has splits; data without "
                                       "splits is all test.")] = "test",
    size: SizeOpt = None,
    labels_csv: CsvOpt = None,
    positive_class: Annotated[str | None, typer.Option(
        "--positive-class", help="Binary models saved without an operating point: the class "
        "that is the finding (newer models carry theirs).")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Name of this external test in the run's results.json and report "
        "(default: the data's folder or file name).")] = None,
) -> None:
    """Evaluate a trained model on a split of a dataset, or on all of a folder or file
    without splits (an external test set), and keep the result in the run."""
    from privmed.cli.external_eval import eval_images, record_evaluation, require_data
    from privmed.models import load_model
    from privmed.training import evaluate as evaluate_model
    from privmed.training.decision import model_operating_point

    data = require_data(data, "evaluate")
    model, info = load_model(run)
    op = model_operating_point(info, positive_class)
    dataset, how = eval_images(data, split, size, labels_csv, info)
    console.print(f"Evaluating on {data}: {len(dataset)} images ({how}).", highlight=False)
    metrics = evaluate_model(model, dataset, operating_point=op)
    _print_metrics(split if how.startswith("its") else Path(data).name, metrics, info)
    recorded = record_evaluation(run, info, name, data, split, how, dataset, metrics)
    if recorded:
        console.print(recorded)


def _print_metrics(split: str, metrics: dict, info: dict) -> None:
    from privmed.cli.metrics_view import operating_point_line, print_metrics
    from privmed.training.decision import model_operating_point

    print_metrics(console, {split: metrics}, title=f"Metrics on {split}",
                  classes=list(info["class_names"]))
    op = model_operating_point(info, metrics.get("positive_class"))
    line = operating_point_line(op.to_dict() if op is not None else None)
    if line:
        console.print(line)
    console.print(f"Confusion matrix (rows = true {info['class_names']}): "
                  f"{metrics['confusion_matrix']}")
    p = info["meta"].get("privacy") or {}
    if p.get("enabled"):
        console.print(f"Model trained with (ε = {p['epsilon']:.3f}, δ = {p['delta']:g}).")


@app.command()
def report(run: Annotated[Path, typer.Argument(help="A run folder with results.json.")]) -> None:
    """(Re)write report.html of a run from its results.json."""
    from privmed.report import write_report

    path = write_report(run)
    console.print(f"Wrote [bold]{path}[/]")


@app.command()
def models() -> None:
    """List the registered DP-compatible models."""
    from privmed.models import RECOMMENDED_MODEL, list_models

    table = Table(title="Models")
    table.add_column("name")
    table.add_column("description")
    for spec in list_models():
        mark = " (default)" if spec.name == RECOMMENDED_MODEL else ""
        table.add_row(spec.name + mark, spec.description)
    console.print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's runs.")] = Path(
        "runs/demo"),
) -> None:
    """Synthetic chest X-rays -> DP-SGD at epsilon 3 -> metrics -> report, with a ledger."""
    import shutil

    from privmed.data import load_data
    from privmed.errors import BudgetExceededError
    from privmed.privacy import PrivacyConfig
    from privmed.training import TrainConfig
    from privmed.training.run import train_run

    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)  # the demo always starts clean; it only ever writes here
    bundle = load_data("synthetic")
    ledger = out / "ledger.sqlite"
    console.rule("[bold]1. Data")
    console.print(f"Synthetic chest X-rays: {len(bundle.train)} train / {len(bundle.val)} val / "
                  f"{len(bundle.test)} test images of shape {bundle.train.image_shape}, classes "
                  f"{list(bundle.class_names)}; dataset id {bundle.train.dataset_id}.")
    console.rule("[bold]2. De-identify before export: DICOM headers (PS3.15 Basic Profile)")
    from privmed.cli.deid_cmds import demo_deid

    deid = demo_deid(bundle, out / "deid")
    console.rule("[bold]3. De-identify the patient table: k-anonymity, l-diversity, DP "
                 "statistics")
    from privmed.cli.tabular_cmds import demo_tabular

    tab = demo_tabular(out / "tabular", ledger)
    console.rule("[bold]4. DP-SGD at ε = 3, charged to a ledger with budget ε = 4")
    results = train_run(bundle, out / "dp-eps3", config=TrainConfig(),
                        privacy=PrivacyConfig(target_epsilon=3.0), ledger_path=ledger,
                        budget_epsilon=4.0, command="privmed demo")
    print_summary(results, out / "dp-eps3")
    console.rule("[bold]5. The same model without privacy, for comparison")
    plain = train_run(bundle, out / "no-dp", config=TrainConfig(epochs=15, batch_size=128,
                                                                lr=1e-3),
                      privacy=None, command="privmed demo", progress=False)
    print_summary(plain, out / "no-dp")
    console.rule("[bold]6. The ledger refuses a run that would overspend")
    console.print("A second run at ε = 4 fits the budget alone, but not composed with the "
                  "first:")
    try:
        train_run(bundle, out / "dp-eps4", config=TrainConfig(),
                  privacy=PrivacyConfig(target_epsilon=4.0), ledger_path=ledger,
                  progress=False)
        console.print("[red]The ledger accepted it: this is a bug, please report it.[/]")
    except BudgetExceededError as exc:
        console.print(f"[yellow]{exc}[/]")
    console.rule("[bold]7. Federated: 3 hospitals on Flower, secure aggregation, local DP at ε = 3")
    fed = _demo_federation(bundle, out / "federated", distributed=False)
    console.rule("[bold]8. Distributed DP: each hospital adds 1/√t of the noise (simulation)")
    dist = _demo_federation(bundle, out / "distributed", distributed=True)
    console.rule("[bold]9. Encrypted inference: the clinic's keys never leave it (CKKS)")
    from privmed.cli.he_cmds import demo_encrypted

    he = demo_encrypted(bundle, out / "encrypted")
    console.rule("[bold]10. Privacy audit: attack the models, measured ε next to claimed ε")
    from privmed.cli.audit_cmds import demo_audit

    audit = demo_audit(bundle, {"DP-SGD (step 4)": out / "dp-eps3",
                                "no DP (step 5)": out / "no-dp"}, federated=out / "federated")
    console.rule("[bold]Done")
    dp_auc, plain_auc, fed_auc, dist_auc = (r["metrics"]["test"]["roc_auc"]
                                            for r in (results, plain, fed, dist))
    console.print(f"Test ROC-AUC {dp_auc:.3f} at ε = {results['privacy']['epsilon']:.2f} vs "
                  f"{plain_auc:.3f} without DP; federated over 3 sites {fed_auc:.3f} with local "
                  f"DP and {dist_auc:.3f} with distributed DP, at ε ≤ "
                  f"{max(fed['privacy']['epsilon'], dist['privacy']['epsilon']):.2f} per site; "
                  f"encrypted inference agrees with plaintext on {he['same_decisions']:.0%} "
                  f"(AUC {he['auc_encrypted']:.3f}); membership inference measures ε ≥ "
                  f"{audit['DP-SGD (step 4)']['eps_lb']:.2f} on the DP model; de-identification "
                  f"left {deid['phi_found']} PHI strings in {deid['deidentified']} DICOM files, "
                  f"the patient table was released {tab['k_achieved']}-anonymous and "
                  f"{tab['l_achieved']}-diverse (pycanon) and its DP statistics cost ε = "
                  f"{tab['dp_epsilon']:.2f} on the same ledger. "
                  f"Reports: [bold]{out / 'dp-eps3' / 'report.html'}[/], "
                  f"[bold]{out / 'federated' / 'report.html'}[/] and "
                  f"[bold]{out / 'distributed' / 'report.html'}[/] "
                  f"(demo took {time.perf_counter() - start:.0f} s).")


def _demo_federation(bundle, out: Path, distributed: bool) -> dict:
    """Local DP on real Flower processes (3 rounds of 2 epochs), or distributed DP on
    Flower's simulation engine (30 FedSGD rounds: one step each, cheap there)."""
    from privmed.cli.printing import print_federated_results, round_progress, say
    from privmed.federation.runtime.local import run_sites

    if distributed:
        job = dict(rounds=30, batch_size=128, lr=0.05, epsilon=3.0, dp="distributed")
    else:
        job = dict(rounds=3, local_epochs=2, batch_size=128, epsilon=3.0, dp="local",
                   normalize=True)
    # The demo's own ledgers (it starts clean): never the user's per-user ones.
    fed = run_sites(out, simulation=distributed, data=bundle, sites=3, budget_epsilon=4.0,
                    ledger_dir=out / "ledgers", say=say, watch=round_progress,
                    **job)  # type: ignore[arg-type]
    print_federated_results(fed, out)
    return fed
