"""Running privmed's Flower processes from tests: a federation run through the CLI, a
started ``privmed`` process, and where a run's sites keep their ledgers and replies. How
processes are started, stopped, found and waited on is tests/procs.py's."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_run import run_cli
from procs import ENV, alive, reap, start_privmed, starts_processes

__all__ = ["ENV", "alive", "privmed", "reap", "site_dataset", "site_ledger", "site_rounds",
           "start"]


@starts_processes
def privmed(*args: str, timeout: int = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """A command that returns but may run a federation (a SuperLink, SuperNodes, the apps)
    on its way, run as ``cli_run.run_cli`` runs it: a forked process with the environment a
    subprocess would get (see tests/cli_run.py)."""
    return run_cli(args, env=ENV, cwd=cwd, timeout=timeout)


@starts_processes
def start(*args: str, log: Path) -> subprocess.Popen:
    """``python -m privmed ARGS`` left running, in its own process group (procs.start)."""
    return start_privmed(*args, log=log)


def site_ledger(out: Path, site: str, ledger_dir: Path) -> Path:
    """The ledger ``federate``/``simulate`` kept for ``site`` of the run in ``out``: the
    --ledger-dir's one ledger, shared by the sites and charged per record (not --out's)."""
    from privmed.privacy.ledger_home import ledger_file

    return ledger_file(ledger_dir)


def site_dataset(out: Path, site: str) -> str:
    """The dataset id of ``site``'s training data in the run in ``out`` (its spends in the
    shared ledger are recorded under it)."""
    from privmed.data import load_data

    return load_data(out / "sites" / f"{site}.npz").train.dataset_id


def site_rounds(out: Path, site: str, ledger_dir: Path) -> Path:
    """Where ``site``'s node keeps its released replies beside the shared ledger:
    ``ledger.sqlite.rounds/<dataset id>/`` (then ``JOB/round-N.pt``)."""
    ledger = site_ledger(out, site, ledger_dir)
    return ledger.parent / f"{ledger.name}.rounds" / site_dataset(out, site)
