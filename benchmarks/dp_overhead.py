"""DP-SGD step time and peak memory relative to non-private training.

For every registered model, at the same batch size, measured in this one run:
plain SGD; DP-SGD with Opacus hooks (per-sample gradients materialised), with
functorch (vmap) per-sample gradients, and with ghost clipping (norms only).
For ScatterNet models the step is the head's, as in fit(), which computes the
fixed scattering features once. Each configuration runs in its own subprocess
so that its peak resident memory (ru_maxrss) is its own.

A second table times whole fit() runs of the recommended model with and
without DP (same data, epochs and batch size): what a user waits for,
including noise calibration and the one-off scattering transform.

DP steps add their noise as fit() does, from privmed's CSPRNG
(privmed.privacy.SecureRandom, ChaCha20). A third table prices that: the
noise of one step for the largest registered model (most trained
parameters) from the CSPRNG and from torch.normal (Opacus's default, a
Mersenne Twister), side by side, the whole DP step of that model with each,
and Poisson sampling of a dataset (CSPRNG vs torch.rand).

    .venv/bin/python benchmarks/dp_overhead.py [--batch-size 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

MODES = ("plain", "dp-hooks", "dp-functorch", "dp-ghost")
NOISES = ("csprng", "torch")  # where a DP step's noise comes from: privmed's, or Opacus's MT


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def trained_parameters(model_name: str) -> int:
    """Parameters DP-SGD trains (a ScatterNet's head only), on the benchmark's images."""
    from privmed.data import make_synthetic
    from privmed.models import create_model, model_kwargs

    shape = make_synthetic(n_train=2, n_val=0, n_test=0).train.image_shape
    model = create_model(model_name, shape[0], 2, **model_kwargs(model_name, shape))
    model = model.head if getattr(model, "fixed_features", None) is not None else model
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def noise_cost(params: int, records: int, repeats: int, threads: int) -> dict:
    """Seconds to draw one step's noise for ``params`` and to Poisson-sample ``records``."""
    import torch

    from privmed.privacy import SecureRandom

    torch.set_num_threads(threads)
    rng = SecureRandom()
    q = 0.25
    return {
        "params": params, "records": records,
        "csprng_s": _median_s(lambda: rng.gaussian(params, 1.0), repeats),
        "torch_s": _median_s(lambda: torch.normal(0.0, 1.0, (params,)), repeats),
        "sample_csprng_s": _median_s(lambda: rng.bernoulli(records, q), repeats),
        "sample_torch_s": _median_s(lambda: torch.rand(records) < q, repeats),
    }


def measure(model_name: str, mode: str, batch_size: int, steps: int, threads: int,
            noise: str = "csprng") -> dict:
    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from privmed.data import make_synthetic
    from privmed.models import create_model, model_kwargs
    from privmed.privacy import SecureRandom
    from privmed.privacy.dpsgd import with_secure_noise

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = make_synthetic(n_train=batch_size * 4, n_val=10, n_test=10).train
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = create_model(model_name, data.image_shape[0], data.num_classes,
                         **model_kwargs(model_name, data.image_shape))
    inputs = data.images
    if getattr(model, "fixed_features", None) is not None:
        # As in fit(): the fixed front end runs once, only the head trains per step.
        with torch.no_grad():
            inputs = model.fixed_features(inputs)
        model = model.head
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(inputs, data.labels), batch_size=batch_size)
    if mode != "plain":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                grad_sample_mode=mode.removeprefix("dp-"))
        model, optimizer = out[0], out[1]
        if noise == "csprng":  # as fit() adds it
            optimizer = with_secure_noise(optimizer, SecureRandom())
        if mode == "dp-ghost":
            criterion = out[2]
    images, labels = inputs[:batch_size], data.labels[:batch_size]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model_name, "mode": mode, "noise": noise, "step_s": times[len(times) // 2],
            "peak_mb": peak / 1024, "train_mb": max(peak - base_rss, 1) / 1024}


def fit_seconds(private: bool, threads: int) -> dict:
    import torch

    from privmed.data import make_synthetic
    from privmed.models import RECOMMENDED_MODEL, create_model, model_kwargs
    from privmed.privacy import PrivacyConfig
    from privmed.training import TrainConfig, fit

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bundle = make_synthetic(n_train=4096, n_val=512, n_test=10)
    shape = bundle.train.image_shape
    model = create_model(RECOMMENDED_MODEL, shape[0], bundle.train.num_classes,
                         **model_kwargs(RECOMMENDED_MODEL, shape))
    privacy = PrivacyConfig(target_epsilon=3.0) if private else None
    start = time.perf_counter()
    fit(model, bundle.train, bundle.val, TrainConfig(epochs=30), privacy)
    return {"model": RECOMMENDED_MODEL, "private": private,
            "fit_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=int, default=100_000,
                        help="dataset size for the Poisson-sampling cost")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--noise", choices=NOISES, default="csprng", help=argparse.SUPPRESS)
    parser.add_argument("--fit", choices=("plain", "dp"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.batch_size, args.steps, args.threads,
                                 args.noise)))
        return
    if args.fit is not None:
        print(json.dumps(fit_seconds(args.fit == "dp", args.threads)))
        return

    from privmed.models import list_models

    rows = []
    for spec in list_models():
        for mode in MODES:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", spec.name, mode, "--batch-size",
                 str(args.batch_size), "--steps", str(args.steps), "--threads",
                 str(args.threads)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{spec.name} {mode}: failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nbatch size {args.batch_size}, median of {args.steps} steps, "
          f"{args.threads} threads\n")
    print("train MB = peak resident memory above the process's footprint after loading data")
    print(f"{'model':<12} {'mode':<9} {'step ms':>8} {'x plain':>8} {'train MB':>9} "
          f"{'x plain':>8} {'peak MB':>8} {'x plain':>8}")
    for r in rows:
        plain = next(p for p in rows if p["model"] == r["model"] and p["mode"] == "plain")
        print(f"{r['model']:<12} {r['mode']:<9} {1000 * r['step_s']:8.1f} "
              f"{r['step_s'] / plain['step_s']:8.2f} {r['train_mb']:9.1f} "
              f"{r['train_mb'] / plain['train_mb']:8.2f} {r['peak_mb']:8.0f} "
              f"{r['peak_mb'] / plain['peak_mb']:8.2f}")

    print_noise_cost(args, rows)

    fits = {}
    for kind in ("plain", "dp"):
        proc = subprocess.run([sys.executable, __file__, "--fit", kind, "--threads",
                               str(args.threads)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"fit {kind}: failed: {proc.stderr.strip().splitlines()[-1]}")
            return
        fits[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nwhole fit() of {fits['plain']['model']} (4096 synthetic images, 30 epochs, "
          f"batch 1024): plain {fits['plain']['fit_s']:.1f} s, DP (epsilon 3) "
          f"{fits['dp']['fit_s']:.1f} s, ratio {fits['dp']['fit_s'] / fits['plain']['fit_s']:.2f}")


def print_noise_cost(args: argparse.Namespace, rows: list[dict]) -> None:
    """The CSPRNG's price: noise per step of the largest model, its DP step, sampling."""
    from privmed.models import list_models

    sizes = {spec.name: trained_parameters(spec.name) for spec in list_models()}
    largest = max(sizes, key=sizes.get)
    cost = noise_cost(sizes[largest], args.records, max(args.steps, 20), args.threads)
    print(f"\nnoise per step, largest model {largest} ({sizes[largest]:,} trained parameters), "
          f"median of {max(args.steps, 20)}, {args.threads} threads:")
    print(f"  CSPRNG (ChaCha20, 4 Box-Muller normals per value) "
          f"{1000 * cost['csprng_s']:8.3f} ms   torch.normal {1000 * cost['torch_s']:8.3f} ms"
          f"   ratio {cost['csprng_s'] / cost['torch_s']:6.1f}x"
          f"   ({1e9 * cost['csprng_s'] / cost['params']:.0f} ns per parameter)")
    print(f"Poisson sampling of {cost['records']:,} records: CSPRNG "
          f"{1000 * cost['sample_csprng_s']:.3f} ms, torch.rand "
          f"{1000 * cost['sample_torch_s']:.3f} ms, ratio "
          f"{cost['sample_csprng_s'] / cost['sample_torch_s']:.1f}x")
    secure = next((r for r in rows if r["model"] == largest and r["mode"] == "dp-hooks"), None)
    proc = subprocess.run(
        [sys.executable, __file__, "--one", largest, "dp-hooks", "--noise", "torch",
         "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads",
         str(args.threads)], capture_output=True, text=True, check=False)
    if secure is None or proc.returncode != 0:
        print(f"{largest} dp-hooks step with torch noise: not measured")
        return
    mt = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{largest} dp-hooks step (batch {args.batch_size}): CSPRNG noise "
          f"{1000 * secure['step_s']:.1f} ms, torch.normal noise {1000 * mt['step_s']:.1f} ms, "
          f"ratio {secure['step_s'] / mt['step_s']:.3f}")


if __name__ == "__main__":
    main()
