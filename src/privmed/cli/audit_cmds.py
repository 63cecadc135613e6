"""``privmed audit membership`` and ``privmed audit inversion``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from privmed.cli.app import audit_app, console


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def save_audit(run: Path, section: dict) -> Path:
    """Merge ``section`` into the run's results.json ``audit`` and re-render its report;
    what was already there (training, other audits) is kept."""
    from privmed.report import read_results, write_report, write_results

    results = read_results(run)
    results["audit"] = {**(results.get("audit") or {}), **section}
    write_results(run, results)
    return write_report(run)


def print_membership(m: dict, one_run: dict | None = None) -> None:
    table = Table("attack", "ROC-AUC", "TPR@0.1%FPR", "TPR@1%FPR",
                  f"ε ≥ ({m['confidence']:.0%} conf.)", title="Membership inference")
    for key, name in (("lira", m["attack"]), ("lira_offline", "lira-offline"),
                      ("loss", "loss-threshold")):
        x = m.get(key)
        if x:
            table.add_row(name, _fmt(x["auc"]), _fmt(x["tpr_at_fpr_0.001"]),
                          _fmt(x["tpr_at_fpr_0.01"]), _fmt(x["epsilon"]["eps_lb"], ".2f"))
    console.print(table)
    claimed = m.get("claimed_epsilon")
    console.print(f"Claimed ε = {_fmt(claimed, '.2f') if claimed is not None else 'none (no DP)'}"
                  f"; measured lower bound ε ≥ {m['eps_lb']:.2f} "
                  f"({'consistent' if m['consistent'] else '[red]EXCEEDS THE CLAIM[/]'}).")
    if one_run:
        console.print(f"One-run audit: {one_run['correct']}/{one_run['guesses']} canary guesses "
                      f"right, ε ≥ {one_run['eps_lb']:.2f}.")


@audit_app.command("membership")
def membership_cmd(
    run: Annotated[Path, typer.Argument(help="A training run folder (results.json, model.pt).")],
    data: Annotated[str, typer.Option("--data", help="The data the run was trained on; its "
                                      "test split supplies the non-members.")],
    shadows: Annotated[int, typer.Option("--shadows", help="Shadow models (LiRA).")] = 8,
    offline: Annotated[bool, typer.Option("--offline", help="Offline LiRA only (OUT "
                                          "shadows).")] = False,
    one_run: Annotated[bool, typer.Option("--one-run", help="Also run the one-run canary "
                                          "audit of Steinke et al. 2023.")] = False,
    canaries: Annotated[int, typer.Option("--canaries")] = 100,
    max_examples: Annotated[int | None, typer.Option("--max-examples", help="Members + "
                                                     "non-members to score.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Attack a trained model's membership (LiRA, LOSS); put the measured ε next to the
    claimed ε in its results.json and report."""
    from privmed.audit.membership import audit_membership, one_run_audit, read_recipe
    from privmed.data import load_data

    bundle = load_data(data)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("Training shadow models", total=shadows)
        result = audit_membership(run, bundle, shadows=shadows, online=not offline, seed=seed,
                                  max_examples=max_examples,
                                  progress=lambda done, total: bar.update(task, completed=done))
        if one_run:
            recipe = read_recipe(run, bundle)
            bar.add_task("One-run canary audit", total=None)
            result.update(one_run_audit(bundle, model_name=recipe.name, config=recipe.config,
                                        privacy=recipe.privacy, canaries=canaries, seed=seed))
    print_membership(result["membership"], result.get("one_run"))
    report = save_audit(run, result)
    console.print(f"Wrote the audit into {run / 'results.json'} and [bold]{report}[/].")


def demo_audit(bundle: Any, runs: dict[str, Path], shadows: int = 8) -> dict[str, dict]:
    """Demo step: LiRA against each run; the measured ε lands in each run's report."""
    from privmed.audit.membership import audit_membership

    out = {}
    table = Table("run", "claimed ε", "LiRA AUC", "TPR@1%FPR", "measured ε ≥",
                  title=f"Membership inference, {shadows} shadow models each")
    for name, run in runs.items():
        m = audit_membership(run, bundle, shadows=shadows)["membership"]
        save_audit(run, {"membership": m})
        claimed = m["claimed_epsilon"]
        table.add_row(name, _fmt(claimed, ".2f") if claimed is not None else "none",
                      _fmt(m["lira"]["auc"]), _fmt(m["lira"]["tpr_at_fpr_0.01"]),
                      _fmt(m["eps_lb"], ".2f"))
        out[name] = m
    console.print(table)
    return out
