"""Every site on this machine: ``privmed federate`` (a SuperLink and one ``privmed node``
process per site on loopback) and ``privmed simulate`` (Flower's simulation engine), the
sites split from one dataset or given one per hospital, each charged to its own ledger."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privmed.errors import ConfigError
from privmed.federation.config import FederationConfig, federation_job
from privmed.federation.runtime.deploy import Coordinator, Watch, job_id_for, watched
from privmed.processes import ProcessGroup

if TYPE_CHECKING:
    from privmed.data import DataBundle


def node_process(data: Path, superlink: str, name: str, home: Path, ledger: Path | None,
                 budget: float | None, sites: int) -> list[str]:
    # Plain text on purpose: the SuperLink and every node share this machine's loopback.
    cmd = [sys.executable, "-m", "privmed", "node", "--data", str(data), "--superlink",
           superlink, "--name", name, "--home", str(home), "--insecure"]
    if sites >= 2:  # a secure-aggregation roster is never larger than the sites started
        cmd += ["--max-sites", str(sites)]
    if ledger is not None:
        cmd += ["--ledger", str(ledger)]
    if budget is not None:
        cmd += ["--budget-epsilon", str(budget)]
    return cmd


def run_local_federation(job: FederationConfig, site_paths: list[Path], heldout: Path,
                         out: Path, *, resume: bool, source: str,
                         budget_epsilon: float | None, ledger_dir: Path | None = None,
                         on_round: Callable[[dict], None] | None = None,
                         say: Callable[[str], None] = print) -> dict:
    """A SuperLink and one ``privmed node`` process per site on loopback, the job, and
    every process stopped afterwards (also on Ctrl-C or failure). Each site's ledger is
    keyed to its data in ``ledger_dir`` (None: the per-user folder); a job that would
    take a site over its budget is refused before anything starts."""
    import os

    from privmed.federation.runtime.site_ledgers import site_ledgers

    sites = site_ledgers(site_paths, job, ledger_dir, budget_epsilon, check=not resume,
                         say=say)
    with ProcessGroup() as group:
        coord = Coordinator(group, out / "coordinator")
        procs = []
        for site in sites:
            home = out / "nodes" / site.name
            procs.append(group.start(site.name, node_process(
                site.data, coord.address, site.name, home, site.ledger, site.budget_epsilon,
                len(site_paths)),
                dict(os.environ), home / "node.log"))
        say(f"Started a SuperLink on {coord.address} and {len(site_paths)} nodes "
            f"(logs in {out / 'nodes'}).")
        coord.wait_for_nodes(len(site_paths), 180.0, procs, say=say)
        return coord.run(job, heldout, out, resume=resume, source=source, on_round=on_round)


def run_simulation(job: FederationConfig, site_paths: list[Path], heldout: Path, out: Path, *,
                   resume: bool, source: str, budget_epsilon: float | None,
                   ledger_dir: Path | None = None,
                   on_round: Callable[[dict], None] | None = None,
                   say: Callable[[str], None] = print) -> dict:
    """The same ServerApp and ClientApp on Flower's simulation engine (Ray): one virtual
    node per site, all in this machine's Ray actors; ledgers as in
    :func:`run_local_federation`."""
    from privmed.federation.runtime.site_ledgers import site_ledgers

    sites = site_ledgers(site_paths, job, ledger_dir, budget_epsilon, check=not resume,
                         say=say)
    with ProcessGroup() as group:
        coord = Coordinator(group, out / "coordinator", simulation=True)
        say(f"Simulating {len(site_paths)} sites on Flower's simulation engine "
            f"(SuperLink {coord.address}).")
        sim = {"sites": [str(p.resolve()) for p in site_paths],
               "ledgers": [str(s.ledger.resolve()) if s.ledger else None for s in sites],
               "budgets": [s.budget_epsilon for s in sites]}
        return coord.run(job, heldout, out, resume=resume, source=source, on_round=on_round,
                         simulation=sim)


def prepare_sites(data: str | DataBundle | None, sites: int, site_data: list[Path] | None,
                  heldout: Path | None, scheme: str, alpha: float, seed: int, out: Path,
                  resume: bool) -> tuple[list[Path], Path, str]:
    """Site files, the held-out file and the job's source: given (``site_data`` and
    ``heldout``), or ``data`` split into ``sites`` sites in ``OUT/sites`` (kept when
    resuming), its test split held out for the coordinator."""
    from privmed.data import DataBundle, load_data, save_npz, split_sites
    from privmed.data.medmnist import save_split_npz

    if site_data:
        if heldout is None:
            raise ConfigError("--site-data needs --heldout for the coordinator.")
        return list(site_data), heldout, "site datasets"
    site_dir = out / "sites"
    paths = [site_dir / f"site-{i}.npz" for i in range(1, sites + 1)]
    held_path = site_dir / "heldout.npz"
    name = data.source if isinstance(data, DataBundle) else data
    if not (resume and all(p.exists() for p in [*paths, held_path])):
        bundle = data if isinstance(data, DataBundle) else load_data(str(data), seed=seed)
        if bundle.test is None:
            raise ConfigError(f"{name} has no test split to hold out for the coordinator.")
        for path, part in zip(paths, split_sites(bundle, sites, scheme, alpha, seed),
                              strict=True):
            save_npz(part, path)
        save_split_npz(bundle.test, held_path, "test")
    return paths, held_path, f"{name} split over {sites} sites ({scheme})"


def run_sites(out: Path, *, simulation: bool = False, data: str | DataBundle | None = None,
              sites: int = 3, site_data: list[Path] | None = None,
              heldout: Path | None = None, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, resume: bool = False, budget_epsilon: float | None = None,
              ledger_dir: Path | None = None, model: str | None = None,
              rounds: int | None = None, say: Callable[[str], None] = print,
              watch: Watch | None = None, **settings: Any) -> dict:
    """``privmed federate`` (node processes on loopback, :func:`run_local_federation`) or,
    with ``simulation``, ``privmed simulate`` (Flower's simulation engine,
    :func:`run_simulation`): the sites (:func:`prepare_sites`), the job
    (:func:`~privmed.federation.config.federation_job` of ``model``, ``rounds``, ``seed``
    and ``settings``, one node per site required) and its results."""
    from privmed.data.evalset import load_eval_split
    from privmed.federation.runtime.launcher import require_flower

    require_flower(simulation=simulation)
    out.mkdir(parents=True, exist_ok=True)
    paths, held_path, source = prepare_sites(data, sites, site_data, heldout, scheme, alpha,
                                             seed, out, resume)
    load_eval_split(held_path)  # readable before any process starts
    job = federation_job(job_id_for(out, resume), model, rounds=rounds, seed=seed,
                         min_nodes=len(paths), **settings)
    runner = run_simulation if simulation else run_local_federation
    with watched(watch, job.rounds) as on_round:
        return runner(job, paths, held_path, out, resume=resume,
                      source=f"{source}, simulated" if simulation else source,
                      budget_epsilon=budget_epsilon, ledger_dir=ledger_dir,
                      on_round=on_round, say=say)
