"""Patient-level vs image-level DP-SGD: test ROC-AUC at the same ε, the ε a per-image run
really gives the patient with the most images (group privacy), and wall time of both.

Data: PneumoniaMNIST has no patient ids, so patients are generated with a fixed seed
(``--patient-seed``): each patient gets 1-5 training images drawn uniformly, all of one
label (a patient's follow-ups share the finding), grouped at random within a label. The
images of such a "patient" are not alike as one person's X-rays are, so the figures
measure the cost of sampling and clipping per patient, not of correlated images. The
synthetic data (``make_synthetic(images_per_patient=(1, 5))``) has real structure: one
patient's images are noisy views of one underlying image.

The wall time of each run is printed, and the seconds per epoch of both units measured
side by side (fitted alternately, median of 3) with their ratio. Both units use the same
recipe as ``benchmarks/utility.py`` (scatter-linear, full batch
so q = 1, 300 steps, δ = 1e-5) and the same seed; only the unit differs.

    .venv/bin/python benchmarks/patient_level.py                  # both datasets, ε 1 3 8
    .venv/bin/python benchmarks/patient_level.py --datasets synthetic --epsilons 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"
RECIPE = {"epochs": 300, "batch_size": 8192, "lr": 1e-2}  # benchmarks/utility.py's DP recipe
DELTA = 1e-5


def generated_patients(labels: np.ndarray, seed: int, low: int = 1, high: int = 5
                       ) -> tuple[str, ...]:
    """A patient id per image: ``low..high`` images per patient (uniform), one label each."""
    rng = np.random.default_rng(seed)
    ids = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        while start < len(idx):
            k = int(rng.integers(low, high + 1))
            ids[idx[start:start + k]] = f"c{label}-p{start}"
            start += k
    return tuple(ids)


def with_patients(bundle, seed: int):
    from privmed.data.dataset import DataBundle, ImageDataset

    t = bundle.train
    ids = generated_patients(t.labels.numpy(), seed)
    train = ImageDataset(t.images, t.labels, t.class_names, t.name, ids)
    return DataBundle(train, bundle.val, bundle.test, bundle.source, bundle.info)


def run_one(bundle, model_name: str, epsilon: float, unit: str, seed: int) -> dict:
    import torch

    from privmed.models import create_model, model_kwargs
    from privmed.privacy import PrivacyConfig
    from privmed.privacy.group import group_privacy
    from privmed.training import TrainConfig, evaluate, fit

    torch.manual_seed(seed)
    shape = bundle.train.image_shape
    model = create_model(model_name, shape[0], bundle.train.num_classes,
                         **model_kwargs(model_name, shape))
    start = time.perf_counter()
    result = fit(model, bundle.train, bundle.val, TrainConfig(seed=seed, **RECIPE),
                 PrivacyConfig(target_epsilon=epsilon, delta=DELTA, unit=unit))
    seconds = time.perf_counter() - start
    test = evaluate(result.model, bundle.test)
    most = bundle.train.max_images_per_patient
    eps, delta = result.privacy["epsilon"], result.privacy["delta"]
    # What the largest patient gets: ε itself per patient; group privacy per image.
    eps_patient, delta_patient = (eps, delta) if unit == "patient" else group_privacy(
        eps, delta, most)
    return {"epsilon_target": epsilon, "unit": unit, "units": result.privacy["units"],
            "epsilon": eps, "delta": delta, "largest_patient_images": most,
            "largest_patient_epsilon": eps_patient, "largest_patient_delta": delta_patient,
            "test_auc": test["roc_auc"], "test_accuracy": test["accuracy"],
            "seconds": seconds}


def epoch_seconds(bundle, model_name: str, epochs: int, repeats: int) -> dict[str, float]:
    """Median seconds per DP epoch of each unit, the two fitted alternately (so that other
    load on the machine falls on both alike); no accounting differences: same σ."""
    import statistics

    import torch

    from privmed.models import create_model, model_kwargs
    from privmed.privacy import PrivacyConfig
    from privmed.training import TrainConfig, fit

    shape = bundle.train.image_shape
    times: dict[str, list[float]] = {"patient": [], "image": []}
    for _ in range(repeats):
        for unit in times:
            torch.manual_seed(0)
            model = create_model(model_name, shape[0], bundle.train.num_classes,
                                 **model_kwargs(model_name, shape))
            result = fit(model, bundle.train, None,
                         TrainConfig(**{**RECIPE, "epochs": epochs}),
                         PrivacyConfig(noise_multiplier=1.0, delta=DELTA, unit=unit))
            times[unit].append(statistics.median(e["seconds"] for e in result.epochs))
    return {unit: statistics.median(t) for unit, t in times.items()}


def load(name: str, data: str, patient_seed: int):
    from privmed.data import load_data, make_synthetic

    if name == "synthetic":
        return make_synthetic(seed=0, images_per_patient=(1, 5)), "patients of the generator"
    bundle = load_data(data)
    return (with_patients(bundle, patient_seed),
            f"generated patients, 1-5 images each, seed {patient_seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--datasets", nargs="*", default=["pneumoniamnist", "synthetic"])
    parser.add_argument("--model", default="scatter-linear")
    parser.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--patient-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-epochs", type=int, default=10,
                        help="Epochs per timing fit (0: skip the side-by-side timing).")
    parser.add_argument("--json", type=Path, help="Also write every run's figures here.")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    rows, timing = [], {}
    for name in args.datasets:
        if name == "pneumoniamnist" and not Path(args.data).exists():
            print(f"Skipped pneumoniamnist: {args.data} is absent.", file=sys.stderr)
            continue
        bundle, how = load(name, args.data, args.patient_seed)
        counts = Counter(bundle.train.patient_ids)
        print(f"\n{name}: {len(bundle.train)} training images of {len(counts)} patients "
              f"({how}; mean {len(bundle.train) / len(counts):.2f}, max "
              f"{max(counts.values())} images per patient), {len(bundle.test)} test images, "
              f"{args.model}, δ = {DELTA:g}, seed {args.seed}", flush=True)
        if args.timing_epochs:
            timing[name] = epoch_seconds(bundle, args.model, args.timing_epochs, 3)
            print(json.dumps({"dataset": name, "seconds_per_epoch": timing[name]}), flush=True)
        for eps in args.epsilons:
            for unit in ("patient", "image"):
                row = {"dataset": name, **run_one(bundle, args.model, eps, unit, args.seed)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("\n| data | ε target | unit | test ROC-AUC | test ACC | ε, δ for the largest patient "
          "| wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = r["largest_patient_delta"]
        shown_delta = "≥ 1 (no guarantee)" if d >= 1 else f"{d:.2g}"
        print(f"| {r['dataset']} | {r['epsilon_target']:g} | {r['unit']} | {r['test_auc']:.4f} "
              f"| {r['test_accuracy']:.4f} | {r['largest_patient_epsilon']:.2f} "
              f"({r['largest_patient_images']} images), {shown_delta} | {r['seconds']:.1f} |")
    if timing:
        print("\nSeconds per DP epoch, the two units fitted alternately (median of 3):")
        for name, t in timing.items():
            print(f"  {name}: per patient {t['patient']:.3f} s, per image {t['image']:.3f} s, "
                  f"ratio {t['patient'] / t['image']:.2f}")


if __name__ == "__main__":
    main()
