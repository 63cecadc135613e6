"""Running privmed's Flower processes from tests: the CLI as a subprocess, a started
process group, waiting, and finding a run's leftover processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_run import run_cli

ENV = {**os.environ, "COLUMNS": "200"}


def privmed(*args: str, timeout: int = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """A one-shot command (it returns), run as ``cli_run.run_cli`` runs it: a forked process
    with the environment a subprocess would get (see tests/cli_run.py)."""
    return run_cli(args, env=ENV, cwd=cwd, timeout=timeout)


def start(*args: str, log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-m", "privmed", *args], stdout=fh,
                            stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _matching(marker: str):
    """(pid, command line) of live processes, other than this one and pytest's, that
    mention ``marker`` in their arguments or their environment."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if (marker in args or marker in env) and "pytest" not in args:
            yield int(proc.name), args.strip()


def alive(marker: str) -> list[str]:
    """Command lines of a run's live processes: privmed gives every Flower process a
    FLWR_HOME under the run's folder, and children inherit it, so this finds a run's
    leftovers and no other test's."""
    return [args for _, args in _matching(marker)]


def reap(marker: str) -> list[str]:
    """Kill what ``alive(marker)`` finds: a failed test must not leave a federation running
    that slows every later test (one such leftover once made a CI run miss its deadlines)."""
    found = []
    for pid, args in _matching(marker):
        try:
            os.kill(pid, signal.SIGKILL)
            found.append(args)
        except OSError:  # gone already
            continue
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


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
