"""``privmed audit membership`` and ``privmed audit inversion``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from privmed.cli.app import audit_app, console
from privmed.fileio import write_private_bytes


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _per(record: dict) -> str:
    """' per patient' / ' per image' (older audits: per image)."""
    return f" per {record.get('unit') or 'image'}"


def print_membership(m: dict, one_run: dict | None = None) -> None:
    per = _per(m)
    members = f"{m['members']} member and {m['nonmembers']} non-member {per[5:]}s"
    if m.get("score_aggregation"):  # per patient: how many images, and how they are scored
        members += f", {m['images']} images, each patient's score the {m['score_aggregation']}"
    table = Table("attack", "ROC-AUC", "TPR@0.1%FPR", "TPR@1%FPR",
                  f"ε ≥ ({m['confidence']:.0%} conf.)",
                  title=f"Membership inference{per} ({members})")
    for key, name in (("lira", m["attack"]), ("lira_offline", "lira-offline"),
                      ("loss", "loss-threshold")):
        x = m.get(key)
        if x:
            table.add_row(name, _fmt(x["auc"]), _fmt(x["tpr_at_fpr_0.001"]),
                          _fmt(x["tpr_at_fpr_0.01"]), _fmt(x["epsilon"]["eps_lb"], ".2f"))
    console.print(table)
    claimed, basis = m.get("claimed_epsilon"), m.get("claim_basis")
    how = f" ({basis})" if basis not in (None, "as trained", "no DP") else ""
    said = (f"{claimed:.2f}{per}{how}" if claimed is not None
            else f"none{how}" if how else "none (no DP)")
    console.print(f"Claimed ε = {said}; measured lower bound ε ≥ {m['eps_lb']:.2f}{per} "
                  f"({'consistent' if m['consistent'] else '[red]EXCEEDS THE CLAIM[/]'}).")
    if one_run:
        o_claim = one_run.get("claimed_epsilon")
        console.print(f"One-run audit{_per(one_run)}: {one_run['correct']}/{one_run['guesses']} "
                      f"canary guesses right, ε ≥ {one_run['eps_lb']:.2f}{_per(one_run)} "
                      f"(claimed {_fmt(o_claim, '.2f') if o_claim is not None else 'none'}).")


@audit_app.command("membership")
def membership_cmd(
    run: Annotated[Path, typer.Argument(help="A training run folder (results.json, model.pt).")],
    data: Annotated[str, typer.Option("--data", help="The data the run was trained on; its "
                                      "val split (else test) supplies the non-members.")],
    shadows: Annotated[int, typer.Option("--shadows", help="Shadow models (LiRA).")] = 8,
    offline: Annotated[bool, typer.Option("--offline", help="Offline LiRA only (OUT "
                                          "shadows).")] = False,
    one_run: Annotated[bool, typer.Option("--one-run", help="Also run the one-run canary "
                                          "audit of Steinke et al. 2023.")] = False,
    canaries: Annotated[int, typer.Option("--canaries", help="Canary patients (per "
                                          "patient) or images.")] = 100,
    unit: Annotated[str, typer.Option("--unit", help="Members and non-members are patients "
                                      "(all of a patient's images in or out together) or "
                                      "images; auto: the run's privacy unit.")] = "auto",
    max_examples: Annotated[int | None, typer.Option("--max-examples", help="Members + "
                                                     "non-members to score (patients or "
                                                     "images, as --unit).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Attack a trained model's membership (LiRA, LOSS); put the measured ε next to the
    claimed ε in its results.json and report."""
    from privmed.audit.runs import audit_membership

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("Training shadow models", total=shadows)
        if one_run:
            bar.add_task("then the one-run canary audit", total=None)
        result = audit_membership(run, data, shadows=shadows, online=not offline,
                                  one_run=one_run, canaries=canaries, unit=unit,
                                  max_examples=max_examples, seed=seed,
                                  progress=lambda done, total: bar.update(task,
                                                                          completed=done))
    print_membership(result["membership"], result.get("one_run"))
    console.print(f"Wrote the audit into {run / 'results.json'} and "
                  f"[bold]{run / 'report.html'}[/].")


def demo_audit(bundle: Any, runs: dict[str, Path], federated: Path,
               shadows: int = 8) -> dict[str, dict]:
    """Demo step: LiRA against each run (the measured ε lands in each run's report), and
    gradient inversion of a node's update in the federated run's report."""
    from privmed.audit.inversion import audit_inversion
    from privmed.audit.membership import audit_membership
    from privmed.audit.runs import save_audit
    from privmed.report.html import INVERSION_GRID

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
    result, grid = audit_inversion(None, bundle.test, batch_sizes=(1, 2), steps=300)
    write_private_bytes(federated / INVERSION_GRID, grid)  # 0600: patient images
    save_audit(federated, result)
    rows = {(r["scenario"], r["batch_size"]): r for r in result["inversion"]["rows"]}
    console.print("Gradient inversion of one node's update (batch 1, PSNR / SSIM): "
                  + ", ".join(f"{s} {rows[(s, 1)]['psnr_mean']:.1f} dB / "
                              f"{rows[(s, 1)]['ssim_mean']:.2f}" for s in ("plain", "dp", "secure"))
                  + f" (dp: clipped and noised; secure: the sum the coordinator sees); grid in "
                  f"{federated / 'report.html'}.")
    out["inversion"] = result["inversion"]
    return out


def _int_list(text: str) -> list[int]:
    from privmed.errors import ConfigError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes takes integers separated by commas, got "
                          f"'{text}'.") from None


@audit_app.command("inversion")
def inversion_cmd(
    data: Annotated[str, typer.Option("--data", help="Images the node holds (its test split "
                                      "is used, else train).")],
    run: Annotated[Path | None, typer.Option("--run", help="Add the result and image grid "
                                             "to this run's results.json and report.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for inversion.json and "
                                             "inversion.png (without --run).")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes")] = "1,2,4,8",
    scenarios: Annotated[str, typer.Option("--scenarios", help="Any of plain, dp, secure.")
                         ] = "plain,dp,secure",
    model: Annotated[str | None, typer.Option("--model", help="Registered model the nodes "
                                              "train (default: small-cnn, width 16).")] = None,
    noise_multiplier: Annotated[float, typer.Option("--noise-multiplier")] = 1.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm")] = 1.0,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes in the secure sum.")] = 3,
    steps: Annotated[int, typer.Option("--steps", help="Optimisation steps per attack.")
                     ] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Rebuild a node's images from its update (Inverting Gradients): plain, DP, and what
    the coordinator sees under secure aggregation; PSNR and SSIM of each."""
    import tempfile

    from privmed.audit.runs import audit_inversion

    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    sizes = _int_list(batch_sizes)
    # Without --run, the files go to --out or a fresh folder (said below).
    folder = None if run is not None else (out or Path(tempfile.mkdtemp(
        prefix="privmed-inversion-")))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("Inverting updates", total=len(names) * len(sizes))
        result = audit_inversion(
            data, run=run, out=folder, batch_sizes=sizes, scenarios=names, model=model,
            nodes=nodes, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            steps=steps, seed=seed,
            progress=lambda done, total: bar.update(task, completed=done))
    table = Table("update seen", "batch", "PSNR (dB)", "SSIM", "labels", "mean-image PSNR",
                  title="Gradient inversion (Geiping et al. 2020)")
    for r in result["inversion"]["rows"]:
        table.add_row(r["scenario"], str(r["batch_size"]), _fmt(r["psnr_mean"], ".1f"),
                      _fmt(r["ssim_mean"]), _fmt(r["label_accuracy"], ".0%"),
                      _fmt(r.get("mean_image_psnr"), ".1f"))
    console.print(table)
    if run is not None:
        console.print(f"Wrote the audit into {run / 'results.json'} and "
                      f"[bold]{run / 'report.html'}[/].")
        return
    assert folder is not None
    console.print(f"Wrote [bold]{folder / 'inversion.json'}[/] and "
                  f"[bold]{folder / 'inversion.png'}[/].")
