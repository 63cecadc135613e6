"""Utility of DP training on PneumoniaMNIST: test ROC-AUC and accuracy at
several epsilons (delta = 1e-5) and without DP, mean and spread over seeds.

Hyper-parameters (the RECIPES below) were chosen on the validation split
only; the test split is evaluated once per run, at the end.

    .venv/bin/python benchmarks/utility.py                # all epsilons, 3 seeds
    .venv/bin/python benchmarks/utility.py --epsilons 1 --seeds 1 --model small-cnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"

# Chosen on the validation split (see docs/benchmarks.md for the search).
RECIPES: dict[str, dict] = {
    "dp": {"epochs": 300, "batch_size": 8192, "lr": 1e-2},  # full batch: q = 1, 300 steps
    "none": {"epochs": 15, "batch_size": 128, "lr": 1e-3},
}
# The targets: (min test AUC, min test ACC) per epsilon; None = no DP.
TARGETS = {None: (0.97, 0.90), 1.0: (0.96, 0.88), 0.5: (0.94, None)}


def run_one(bundle, model_name: str, epsilon: float | None, seed: int) -> dict:
    import torch

    from privmed.models import create_model, model_kwargs
    from privmed.privacy import PrivacyConfig
    from privmed.training import TrainConfig, evaluate, fit

    torch.manual_seed(seed)
    recipe = RECIPES["dp" if epsilon is not None else "none"]
    model = create_model(model_name, bundle.train.image_shape[0], bundle.train.num_classes,
                         **model_kwargs(model_name, bundle.train.image_shape))
    privacy = PrivacyConfig(target_epsilon=epsilon, delta=1e-5) if epsilon is not None else None
    start = time.perf_counter()
    result = fit(model, bundle.train, bundle.val, TrainConfig(seed=seed, **recipe), privacy)
    test = evaluate(result.model, bundle.test)
    return {"epsilon_target": epsilon, "epsilon": result.privacy["epsilon"], "seed": seed,
            "val_auc": result.metrics["val"]["roc_auc"], "test_auc": test["roc_auc"],
            "test_accuracy": test["accuracy"], "test_mcc": test["mcc"],
            "seconds": time.perf_counter() - start}


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--model", default="scatter-linear")
    parser.add_argument("--epsilons", nargs="*", type=float, default=[0.5, 1.0, 3.0, 8.0])
    parser.add_argument("--no-plain", action="store_true", help="Skip the non-private run.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write every run's figures here.")
    args = parser.parse_args()

    if args.data.endswith(".npz") and not Path(args.data).exists():
        sys.exit(f"Skipped: {args.data} is absent (run `privmed data fetch pneumoniamnist` "
                 "and pass --data pneumoniamnist).")
    import torch

    from privmed.data import load_data

    torch.set_num_threads(2)
    bundle = load_data(args.data)
    settings = ([] if args.no_plain else [None]) + list(args.epsilons)
    rows = []
    for eps in settings:
        for seed in range(args.seeds):
            row = run_one(bundle, args.model, eps, seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))

    print(f"\n{args.model} on {bundle.source}: {len(bundle.train)} train / {len(bundle.val)} "
          f"val / {len(bundle.test)} test, delta = 1e-5, {args.seeds} seed(s)\n")
    print("| epsilon | test ROC-AUC | test ACC | val ROC-AUC | target AUC / ACC | met |")
    print("|---|---|---|---|---|---|")
    for eps in settings:
        runs = [r for r in rows if r["epsilon_target"] == eps]
        auc = [r["test_auc"] for r in runs]
        acc = [r["test_accuracy"] for r in runs]
        target = TARGETS.get(eps)
        met = "-"
        if target:
            ok = statistics.mean(auc) >= target[0] and (
                target[1] is None or statistics.mean(acc) >= target[1])
            met = "yes" if ok else "no"
        shown = "-" if not target else f"{target[0]} / {target[1] or '-'}"
        print(f"| {'no DP' if eps is None else f'{eps:g}'} | {_stat(auc)} | {_stat(acc)} | "
              f"{_stat([r['val_auc'] for r in runs])} | {shown} | {met} |")


if __name__ == "__main__":
    main()
