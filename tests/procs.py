"""The one way tests run processes: the environment privmed's processes get, a long-lived
process started in its own process group with its output in a log file, stopping and
killing a group, finding a run's leftover processes, and waiting on a condition.

One-shot CLI calls go through tests/cli_run.py, which forks instead of starting a new
interpreter (see its docstring) but takes its environment and its kill and reap from
here. Helpers that start long-lived processes or servers say so with ``@starts_processes``,
those that run the CLI with ``@runs_cli``: tests/conftest.py marks the tests that use them
``processes`` or ``cli``, and ``make test-fast`` leaves those out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

# What every process the tests start gets (tests/conftest.py has set the thread counts and a
# private XDG_DATA_HOME by then, and points XDG_DATA_HOME at each test's own folder).
ENV = {**os.environ, "COLUMNS": "200", "PRIVMED_CACHE": ""}

F = TypeVar("F", bound=Callable)


def marks_tests(*markers: str) -> Callable[[F], F]:
    """Tag a test helper or fixture: tests/conftest.py gives every test that uses it (in its
    body, a fixture, or a helper of its own file) these pytest markers."""
    def tag(helper: F) -> F:
        helper.test_markers = (getattr(helper, "test_markers", frozenset())  # type: ignore
                               | frozenset(markers))
        return helper
    return tag


# Starts long-lived processes or servers (a Flower federation, ``privmed serve``, racers).
starts_processes = marks_tests("processes")
# Runs the privmed CLI as a separate process, one call at a time (tests/cli_run.py).
runs_cli = marks_tests("cli")


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.25) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds, naming ``what``
    was awaited (a fixed sleep is either too short on a loaded machine or always too long)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def privmed_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "privmed", *args]


@starts_processes
def start(cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """``cmd`` as the leader of a new session (its process group: ``stop`` and ``kill`` end
    it and whatever it started in its group), stdin from /dev/null, stdout and stderr into
    ``log``, the environment ``ENV`` as it is now unless ``env`` is given."""
    with open(log, "wb") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, env=dict(ENV if env is None else env),
                                cwd=cwd, start_new_session=True)


@starts_processes
def start_privmed(*args: str, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """``python -m privmed ARGS`` started as ``start`` starts a command."""
    return start(privmed_cmd(*args), log, cwd=cwd)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Send ``sig`` to ``proc``'s process group (or to ``proc``, when it leads none), wait
    up to ``timeout`` seconds, then kill it; nothing if it has already ended."""
    if proc.poll() is not None:
        return
    _signal(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc.pid)
        proc.wait()


def kill(pid: int) -> None:
    """SIGKILL to ``pid`` and, when it leads a process group, to the whole group; then reap
    it if it is this process's child (a forked CLI call, a started process)."""
    _signal(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


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
