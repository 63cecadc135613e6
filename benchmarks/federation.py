"""Federated training on Flower: per-round latency, bytes per node, and utility.

    .venv/bin/python benchmarks/federation.py latency   # 3/5 sites, both engines, 100 sites
    .venv/bin/python benchmarks/federation.py secure      # secure aggregation vs plain FedAvg
    .venv/bin/python benchmarks/federation.py utility     # PneumoniaMNIST over 3 sites vs central
    .venv/bin/python benchmarks/federation.py dpmodes     # distributed vs central vs local DP

Latency runs use the embedded synthetic data and the recommended model; every
deployment run starts real processes on loopback (SuperLink, SuperNodes, node
workers, ServerApp, ClientApps), as `privmed federate` does. Round times are the
coordinator's (send, local training, receive, aggregate, held-out evaluation); "node
s" is the slowest node's own training time inside that round, so the difference is
what transport and orchestration cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"


def _sites(data: str, n: int, out: Path, scheme: str = "iid", alpha: float = 0.5,
           seed: int = 0) -> tuple[list[Path], Path]:
    from privmed.data import load_data, save_npz, split_sites
    from privmed.data.medmnist import save_split_npz

    bundle = load_data(data, seed=seed)
    paths = [save_npz(part, out / "sites" / f"site-{i}.npz")
             for i, part in enumerate(split_sites(bundle, n, scheme, alpha, seed), start=1)]
    held = save_split_npz(bundle.test, out / "sites" / "heldout.npz", "test")
    return paths, held


def run(engine: str, n_sites: int, out: Path, *, data: str = "synthetic", rounds: int = 3,
        dp: str = "none", epsilon: float = 3.0, local_epochs: int = 1, batch_size: int = 128,
        lr: float = 1e-2, scheme: str = "iid", alpha: float = 0.5,
        secure_agg: bool = False, normalize: bool = False,
        secagg_optimistic: bool = True) -> dict:
    from privmed.federation.config import FederationConfig
    from privmed.federation.runtime.local import run_local_federation, run_simulation
    from privmed.models.registry import RECOMMENDED_MODEL

    paths, held = _sites(data, n_sites, out, scheme, alpha)
    job = FederationConfig(job_id=f"bench-{engine}-{n_sites}-{int(time.time())}",
                           model=RECOMMENDED_MODEL, rounds=rounds, local_epochs=local_epochs,
                           batch_size=batch_size, lr=lr, dp=dp, epsilon=epsilon,
                           min_nodes=n_sites, secure_agg=secure_agg, normalize=normalize,
                           secagg_optimistic=secagg_optimistic)
    runner = run_local_federation if engine == "deployment" else run_simulation
    start = time.perf_counter()
    results = runner(job, paths, held, out, resume=False, source=data,
                     budget_epsilon=None if dp == "none" else 2 * epsilon,
                     ledger_dir=out / "ledgers", say=lambda s: None)
    results["wall_s"] = time.perf_counter() - start
    return results


def _round_stats(results: dict, skip_first: bool) -> dict:
    rounds = results["federation"]["rounds"][1 if skip_first else 0:]
    secs = [r["seconds"] for r in rounds]
    node = [max((n["seconds"] or 0) for n in r["nodes"]) for r in rounds]
    up = [n["bytes_up"] for r in rounds for n in r["nodes"] if n.get("bytes_up") is not None]
    down = [n["bytes_down"] for r in rounds for n in r["nodes"] if n.get("bytes_down")]
    return {"round_s": statistics.median(secs), "node_s": statistics.median(node),
            "bytes_down": statistics.median(down) if down else None,
            "bytes_up": statistics.median(up) if up else None,
            "first_round_s": results["federation"]["rounds"][0]["seconds"],
            "wall_s": results["wall_s"]}


def _import_seconds(module: str) -> float:
    """Fresh-interpreter import time: what each ClientApp process pays per message."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def latency(args: argparse.Namespace) -> None:
    rows = []
    for engine in ("deployment", "simulation"):
        for n in (3, 5):
            for dp in ("none", "local"):
                with tempfile.TemporaryDirectory() as tmp:
                    res = run(engine, n, Path(tmp), rounds=args.rounds, dp=dp)
                rows.append({"engine": engine, "sites": n, "dp": dp,
                             **_round_stats(res, skip_first=True)})
                print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = run("simulation", 100, Path(tmp), rounds=2, dp="local", batch_size=16)
    rows.append({"engine": "simulation", "sites": 100, "dp": "local",
                 **_round_stats(res, skip_first=True)})
    print(json.dumps(rows[-1]), flush=True)

    thin = _import_seconds("privmed.federation.runtime.flower")
    fat = _import_seconds("privmed.federation.node")
    print(f"\nper-round figures: median over rounds 2..{args.rounds} (round 1 loads data and "
          "starts workers/actors); synthetic data, scatter-linear, 1 local epoch\n")
    print("| engine | sites | DP | round s | slowest node's training s | overhead s | "
          "bytes down / node | bytes up / node | first round s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['sites']} | {r['dp']} | {r['round_s']:.2f} | "
              f"{r['node_s']:.2f} | {r['round_s'] - r['node_s']:.2f} | "
              f"{r['bytes_down'] or 0:,.0f} | {r['bytes_up'] or 0:,.0f} | "
              f"{r['first_round_s']:.1f} |")
    print(f"\nClientApp process start: importing privmed's thin ClientApp {thin:.2f} s vs the "
          f"training stack (torch, Opacus, privmed.training) {fat:.2f} s per message "
          f"({fat - thin:.2f} s saved per node per round by the long-lived node worker)")


def secure(args: argparse.Namespace) -> None:
    """Secure aggregation against plain FedAvg, same data and settings, side by side: with
    self masks in every round (an unmasking exchange per round) and optimistic (none
    when every node answers, the default)."""
    variants = {"plain": dict(secure_agg=False),
                "self masks": dict(secure_agg=True, secagg_optimistic=False),
                "optimistic": dict(secure_agg=True, secagg_optimistic=True)}
    rows = []
    for engine in args.engines:
        for n in (3, 5):
            stats = {}
            for name, options in variants.items():
                with tempfile.TemporaryDirectory() as tmp:
                    res = run(engine, n, Path(tmp), rounds=args.rounds, dp="local", **options)
                stats[name] = _round_stats(res, skip_first=True)
                print(json.dumps({"engine": engine, "sites": n, "variant": name,
                                  **stats[name]}), flush=True)
            rows.append((engine, n, stats))
    print(f"\nlocal DP, synthetic data, scatter-linear; median of rounds 2..{args.rounds} "
          "(round 1 of a secure run also agrees keys)\n")
    print("| engine | sites | plain round s | secure round s, self masks | secure round s, "
          "optimistic | self masks / plain | optimistic / plain | bytes up / node (plain) | "
          "bytes up / node (secure, masked vector) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for engine, n, p in rows:
        plain = p["plain"]["round_s"]
        print(f"| {engine} | {n} | {plain:.2f} | {p['self masks']['round_s']:.2f} | "
              f"{p['optimistic']['round_s']:.2f} | {p['self masks']['round_s'] / plain:.2f} | "
              f"{p['optimistic']['round_s'] / plain:.2f} | {p['plain']['bytes_up'] or 0:,.0f} | "
              f"{p['optimistic']['bytes_up'] or 0:,.0f} |")


def utility(args: argparse.Namespace) -> None:
    if not Path(args.data).exists():
        sys.exit(f"Skipped: {args.data} is absent.")
    rows = []
    for scheme in ("iid", "dirichlet"):
        for eps in (None, *args.epsilons):
            # Without DP small batches and a small step do better (as centrally).
            batch, lr = (args.batch_size, args.lr) if eps is not None else (128, 1e-3)
            with tempfile.TemporaryDirectory() as tmp:
                res = run("simulation", 3, Path(tmp), data=args.data, rounds=args.rounds,
                          dp="none" if eps is None else "local", epsilon=eps or 3.0,
                          local_epochs=args.local_epochs, batch_size=batch, lr=lr,
                          scheme=scheme, alpha=0.5)
            test = res["metrics"]["test"]
            rows.append({"scheme": scheme, "epsilon": eps, "test_auc": test["roc_auc"],
                         "test_accuracy": test["accuracy"],
                         "epsilon_spent": res["privacy"]["epsilon"]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nPneumoniaMNIST over 3 sites, {args.rounds} rounds x {args.local_epochs} local "
          f"epochs, scatter-linear; local DP per node with batch {args.batch_size}, lr "
          f"{args.lr}; no DP with batch 128, lr 1e-3\n")
    print("| split | ε per node | test ROC-AUC | test ACC |")
    print("|---|---|---:|---:|")
    for r in rows:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        split = "IID" if r["scheme"] == "iid" else "Dirichlet 0.5"
        print(f"| {split} | {eps} | {r['test_auc']:.4f} | {r['test_accuracy']:.4f} |")


def _in_process(bundle, job, tmp: Path) -> dict:
    """The federation in one process (InProcessTransport): the same nodes, ledgers and
    secure aggregation as on Flower, without the per-message transport cost, so that
    hundreds of FedSGD rounds fit in a benchmark."""
    from privmed.data import split_sites
    from privmed.federation import InProcessTransport, SiteNode, run_federation

    nodes = {100 + i: SiteNode(site, ledger=tmp / f"site-{i}.sqlite", name=f"site-{i}")
             for i, site in enumerate(split_sites(bundle, 3, "iid", seed=0))}
    return run_federation(InProcessTransport(nodes), job, bundle.test, tmp / "run",
                          log=lambda s: None)


def dp_modes(args: argparse.Namespace) -> None:
    """Distributed DP (FedSGD, noise split over the nodes) next to central DP-SGD and local
    DP, at the same epsilon per site, on PneumoniaMNIST over 3 IID sites."""
    sys.path.insert(0, str(Path(__file__).parent))
    from utility import RECIPES, run_one

    from privmed.data import load_data
    from privmed.federation import FederationConfig
    from privmed.models.registry import RECOMMENDED_MODEL

    if not Path(args.data).exists():
        sys.exit(f"Skipped: {args.data} is absent.")
    bundle = load_data(args.data)
    central_recipe = RECIPES["dp"]
    rows = []
    for eps in args.epsilons:
        row: dict = {"epsilon": eps}
        if "central" in args.modes:
            row["central"] = run_one(bundle, RECOMMENDED_MODEL, eps, seed=0)["test_auc"]
        jobs = {
            # one full-batch step per round, as the central recipe: q = 1, 300 steps
            "distributed": FederationConfig(
                job_id=f"dist-{eps:g}", model=RECOMMENDED_MODEL,
                rounds=central_recipe["epochs"], batch_size=central_recipe["batch_size"],
                lr=central_recipe["lr"], dp="distributed", epsilon=eps, delta=1e-5,
                normalize=args.normalize, secagg_threshold=args.secagg_threshold),
            "local": FederationConfig(
                job_id=f"local-{eps:g}", model=RECOMMENDED_MODEL, rounds=15, local_epochs=2,
                batch_size=512, lr=1e-2, dp="local", epsilon=eps, delta=1e-5,
                normalize=args.normalize),
        }
        for mode, job in jobs.items():
            if mode not in args.modes:
                continue
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                res = _in_process(bundle, job, Path(tmp))
            row[mode] = res["metrics"]["test"]["roc_auc"]
            row[f"{mode}_epsilon"] = res["privacy"]["epsilon"]
            row[f"{mode}_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nPneumoniaMNIST, scatter-linear, 3 IID sites, delta 1e-5, test ROC-AUC. Central: "
          "300 full-batch DP-SGD steps; distributed: 300 FedSGD rounds of one full-batch step "
          f"per site, secure aggregation threshold {args.secagg_threshold:.2f} of the nodes; "
          "local: 15 rounds x 2 epochs, batch 512, secure aggregation; federated "
          f"normalisation {args.normalize}.\n")
    print("| ε per site | central DP | distributed DP | local DP | distributed - central |")
    print("|---|---:|---:|---:|---:|")
    nan = float("nan")
    for r in rows:
        c, d, loc = (r.get(k, nan) for k in ("central", "distributed", "local"))
        print(f"| {r['epsilon']:g} | {c:.4f} | {d:.4f} | {loc:.4f} | {d - c:+.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("latency", "secure", "utility", "dpmodes"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--engines", nargs="*", default=["deployment", "simulation"],
                        choices=("deployment", "simulation"), help="For 'secure'.")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                        help="'dpmodes': federated normalisation statistics (default on).")
    parser.add_argument("--secagg-threshold", type=float, default=2 / 3,
                        help="'dpmodes': fraction of the nodes that must survive a round.")
    parser.add_argument("--modes", nargs="*", default=["central", "distributed", "local"],
                        choices=("central", "distributed", "local"), help="For 'dpmodes'.")
    parser.add_argument("--epsilons", nargs="*", type=float, default=None,
                        help="Epsilons for 'utility' (default 1 8; no DP always runs) and "
                        "'dpmodes' (default 1 3 8).")
    args = parser.parse_args()
    if args.epsilons is None:
        args.epsilons = [1.0, 3.0, 8.0] if args.part == "dpmodes" else [1.0, 8.0]
    if args.part == "dpmodes":
        dp_modes(args)
        return
    if args.part in ("latency", "secure"):
        args.rounds = args.rounds or 4
        (latency if args.part == "latency" else secure)(args)
    else:
        args.rounds = args.rounds or 15
        utility(args)


if __name__ == "__main__":
    main()
