"""Privacy audits on PneumoniaMNIST: membership inference (LiRA, LOSS, one run) and inversion.

    .venv/bin/python benchmarks/audit.py                        # membership, 16 shadows each
    .venv/bin/python benchmarks/audit.py membership --shadows 8 --no-one-run --json m.json
    .venv/bin/python benchmarks/audit.py inversion --out inv    # PSNR / SSIM table + grid PNG

``membership`` trains the recommended model (scatter-linear, default TrainConfig) without
DP and at each ``--epsilons`` (delta 1e-5, the default for N = 4708), then attacks each run with
``audit_membership`` (online LiRA with ``--shadows`` shadow models, and LOSS; members are
sampled from the training split, as many non-members from the test split) and the
one-run canary audit of Steinke et al. 2023 (``--canaries`` mislabeled canaries). A
positive control, the same model trained without DP, without EMA and for
``--control-epochs`` on a ``--control-size`` image subset, shows the attacks succeeding
where they should. ``inversion`` runs ``audit_inversion`` on test images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"
CONTROL = "no DP, overfit (control)"


def _f(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _setting(bundle: Any, name: str, out: Path, epsilon: float | None, config: Any,
             args: argparse.Namespace) -> dict:
    """Train one run, then attack it (LiRA + LOSS, and the one-run audit of its recipe)."""
    from privmed.audit.membership import audit_membership, one_run_audit, read_recipe
    from privmed.models.registry import RECOMMENDED_MODEL
    from privmed.privacy import PrivacyConfig
    from privmed.training.run import train_run

    start = time.perf_counter()
    privacy = None if epsilon is None else PrivacyConfig(target_epsilon=epsilon)
    res = train_run(bundle, out, model_name=RECOMMENDED_MODEL, config=config, privacy=privacy,
                    progress=False, command="benchmark", say=lambda s: None)
    train_s = time.perf_counter() - start
    audit = audit_membership(out, bundle, shadows=args.shadows, seed=args.seed)
    one = None
    if not args.no_one_run:
        recipe = read_recipe(out, bundle)
        audit.update(one_run_audit(bundle, model_name=recipe.name, config=recipe.config,
                                   privacy=recipe.privacy, seed=args.seed,
                                   canaries=min(args.canaries, len(bundle.train) // 2)))
        one = audit["one_run"]
    if args.out is not None:  # keep the runs, each with its audit in its report
        from privmed.cli.audit_cmds import save_audit

        save_audit(out, audit)
    m = audit["membership"]
    row = {"setting": name, "model": RECOMMENDED_MODEL, "train_images": len(bundle.train),
           "epochs": config.epochs, "claimed_epsilon": m["claimed_epsilon"],
           "noise_multiplier": res["privacy"].get("noise_multiplier"),
           "test_auc": res["metrics"]["test"]["roc_auc"], "membership": m, "one_run": one,
           "consistent": m["consistent"] and (one is None or one["consistent"]),
           "seconds": {"train": round(train_s, 1), "membership": m["seconds"],
                       "one_run": one and one["seconds"],
                       "total": round(time.perf_counter() - start, 1)}}
    one_txt = f", one run ε ≥ {one['eps_lb']:.2f}" if one else ""
    print(f"{name}: LiRA AUC {m['lira']['auc']:.3f}, ε ≥ {m['eps_lb']:.2f}{one_txt} "
          f"({row['seconds']['total']:.0f} s)", flush=True)
    return row


def membership(args: argparse.Namespace, bundle: Any, out: Path) -> dict:
    import numpy as np

    from privmed.data import DataBundle
    from privmed.training import TrainConfig

    rows = [_setting(bundle, "no DP" if eps is None else f"ε = {eps:g}",
                     out / ("no-dp" if eps is None else f"eps-{eps:g}"), eps,
                     TrainConfig(seed=args.seed), args)
            for eps in (None, *args.epsilons)]
    if args.control:
        rng = np.random.default_rng(args.seed)
        idx = np.sort(rng.choice(len(bundle.train), args.control_size, replace=False))
        small = DataBundle(train=bundle.train.subset(idx, name="control subset"),
                           val=bundle.val, test=bundle.test, source=bundle.source)
        config = TrainConfig(epochs=args.control_epochs, batch_size=32, physical_batch_size=32,
                             lr=1e-3, ema_decay=None, seed=args.seed)
        rows.append(_setting(small, CONTROL, out / "control", None, config, args))

    print(f"\nscatter-linear on PneumoniaMNIST ({len(bundle.train)} train / {len(bundle.test)} "
          f"test); online LiRA with {args.shadows} shadow models (pooled variance below 64), "
          "members sampled from train, as many non-members from val (same classes); one-run audit: "
          f"{args.canaries} mislabeled canaries (at most half the training set), LOSS scores. "
          "ε bounds at 95 % confidence; the larger of LiRA and LOSS. Control: "
          f"{args.control_size} training images, {args.control_epochs} epochs, batch 32, "
          "lr 1e-3, no EMA.\n")
    print("| model | claimed ε | test AUC | LiRA AUC | TPR@0.1%FPR | TPR@1%FPR | LOSS AUC | "
          "ε lower bound (95%) | one-run ε lb | consistent | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        m, one, claimed = r["membership"], r["one_run"], r["claimed_epsilon"]
        print(f"| {r['model']}, {r['setting']} | "
              f"{'∞ (no DP)' if claimed is None else f'{claimed:.2f}'} | {r['test_auc']:.4f} | "
              f"{m['lira']['auc']:.3f} | {m['lira']['tpr_at_fpr_0.001']:.3f} | "
              f"{m['lira']['tpr_at_fpr_0.01']:.3f} | {m['loss']['auc']:.3f} | "
              f"{m['eps_lb']:.2f} | {_f(one and one['eps_lb'], '.2f')} | "
              f"{'yes' if r['consistent'] else 'NO'} | {r['seconds']['total']:.0f} |")
    for r in rows:
        m, one = r["membership"], r["one_run"]
        print(f"\n{r['setting']}: {m['members']} members + {m['nonmembers']} non-members; "
              f"LiRA ε ≥ {m['lira']['epsilon']['eps_lb']:.2f}, LOSS ε ≥ "
              f"{m['loss']['epsilon']['eps_lb']:.2f}, offline LiRA AUC "
              f"{m['lira_offline']['auc']:.3f}; train {r['seconds']['train']:.0f} s, shadows + "
              f"attack {m['seconds']:.0f} s" + (f"; one run: {one['correct']}/{one['guesses']}"
                                                f" guesses right of {one['canaries']} canaries, "
                                                f"{one['seconds']:.0f} s" if one else ""), end="")
    print()
    return {"membership": rows}


def inversion(args: argparse.Namespace, bundle: Any, out: Path) -> dict:
    from privmed.audit.inversion import audit_inversion

    extra = {"steps": args.steps} if args.steps else {}
    result, png = audit_inversion(args.inversion_model, bundle.test,
                                  batch_sizes=args.batch_sizes, scenarios=args.scenarios,
                                  seed=args.seed, **extra)
    grid = out / "inversion_grid.png"
    grid.write_bytes(png)
    inv = result["inversion"]
    s = inv["settings"]
    print(f"\n{s['attack']} on {s['model']} ({s['parameters']} parameters) at initialisation, "
          f"{s['images']} PneumoniaMNIST test images; {s['steps']} steps x {s['restarts']} "
          f"restart(s); DP: noise multiplier {s['noise_multiplier']}, clip "
          f"{s['max_grad_norm']}; secure: {s['nodes']} nodes. Guess without any update: the "
          "mean test image.\n")
    print("| scenario | batch | PSNR dB | SSIM | mean-image PSNR dB | mean-image SSIM | "
          "labels right | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in inv["rows"]:
        print(f"| {r['scenario']} | {r['batch_size']} | {r['psnr_mean']:.1f} | "
              f"{r['ssim_mean']:.3f} | {r['mean_image_psnr']:.1f} | {r['mean_image_ssim']:.3f} | "
              f"{r['label_accuracy']:.0%} | {r['seconds']:.0f} |")
    print(f"\nWrote the reconstruction grid to {grid}")
    return {**result, "grid_png": str(grid)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="membership",
                        choices=("membership", "inversion"))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", type=Path, help="Keep the runs / the grid PNG here.")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shadows", type=int, default=16, help="LiRA shadow models per run.")
    parser.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 8.0])
    parser.add_argument("--canaries", type=int, default=200, help="One-run audit canaries.")
    parser.add_argument("--no-one-run", action="store_true", help="Skip the one-run audit.")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="The overfit non-private positive control (default on).")
    parser.add_argument("--control-size", type=int, default=250)
    parser.add_argument("--control-epochs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on 2 cores, 2 threads were 12 %% faster "
                        "when idle but 11x slower while another process computed).")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--scenarios", nargs="*", default=["plain", "dp", "secure"])
    parser.add_argument("--steps", type=int, help="Inversion steps (default: the module's).")
    parser.add_argument("--inversion-model", help="A registered model to invert (default: "
                        "the module's small-cnn).")
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"Skipped: {args.data} is absent.")

    import torch

    from privmed.data import load_data

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_data(args.data)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"privmed-audit-{args.part}-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        fig = (membership if args.part == "membership" else inversion)(args, bundle, out)
    finally:
        if args.out is None and args.part == "membership":
            shutil.rmtree(out, ignore_errors=True)
    fig["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"\n{args.part}: {fig['wall_s']:.0f} s wall")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
