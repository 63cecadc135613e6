"""tests/cli_run.py: a forked ``privmed`` gives what a fresh ``python -m privmed`` gives
(exit code, stdout, stderr), ends at its timeout, and cannot change the test's process."""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import cli_run
import pytest
from cli_run import assert_one_sentence_error, privmed
from procs import wait_until


@pytest.fixture(autouse=True)
def _fork(monkeypatch):
    """This file checks the fork runner itself, even in a PRIVMED_TEST_SUBPROCESS=1 run."""
    monkeypatch.delenv("PRIVMED_TEST_SUBPROCESS", raising=False)


def _fresh(monkeypatch, *args: str, **kw) -> subprocess.CompletedProcess:
    with monkeypatch.context() as m:
        m.setenv("PRIVMED_TEST_SUBPROCESS", "1")
        assert cli_run.fresh_interpreter()
        return privmed(*args, **kw)


@pytest.mark.parametrize("args,code", [
    (["data", "inspect", "synthetic"], 0),  # a Rich table on stdout
    (["ledger", "show", "missing.sqlite"], 2),  # one sentence on stderr; relative to cwd
    (["train", "--no-such-option"], 2),  # Click's usage error, 200 columns wide
])
def test_same_exit_code_and_output_as_a_fresh_interpreter(monkeypatch, tmp_path, args, code):
    forked = privmed(*args, cwd=tmp_path)
    fresh = _fresh(monkeypatch, *args, cwd=tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == \
        (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.returncode == code and forked.args == fresh.args
    if args[0] == "ledger":
        assert_one_sentence_error(forked, 2, "missing.sqlite")
    if args[0] == "train":  # the program name and width of `python -m privmed`
        assert "Usage: python -m privmed train" in forked.stderr
        assert max(map(len, forked.stderr.splitlines())) == 200


def test_a_timeout_kills_the_child(monkeypatch, tmp_path):
    pid_file = tmp_path / "pid"

    def hang() -> None:
        pid_file.write_text(str(os.getpid()))
        print("started", flush=True)
        time.sleep(120)  # the behaviour under test: a command that hangs

    monkeypatch.setattr("privmed.cli.main", hang)  # what `python -m privmed` calls
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        privmed("models", timeout=3)
    assert time.monotonic() - start < 30
    assert info.value.output == "started\n" and info.value.timeout == 3
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


@pytest.mark.parametrize("fresh", [False, True], ids=["fork", "fresh"])
def test_a_timeout_kills_what_the_command_started(monkeypatch, tmp_path, fresh):
    """The call leads a process group: a timeout ends the processes it started too."""
    pid_file = tmp_path / "pid"
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]

    def hang() -> None:  # what the fork runs
        pid_file.write_text(str(subprocess.Popen(sleeper).pid))
        time.sleep(120)  # the behaviour under test: a command that hangs

    code = (f"import pathlib, subprocess, time; p = subprocess.Popen({sleeper!r}); "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid)); time.sleep(120)")
    monkeypatch.setattr("privmed.cli.main", hang)
    monkeypatch.setattr(cli_run, "privmed_cmd", lambda *a: [sys.executable, "-c", code])
    if fresh:
        monkeypatch.setenv("PRIVMED_TEST_SUBPROCESS", "1")
    with pytest.raises(subprocess.TimeoutExpired):
        privmed("models", timeout=5)
    assert pid_file.exists(), "the command did not start its own child within 5 s"
    wait_until(lambda: not _running(int(pid_file.read_text())), 10, "the grandchild to end")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed grandchild waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_child_cannot_change_the_parent(monkeypatch, tmp_path):
    parent_hook = tmp_path / "parent-exit-hook-ran"
    child_hook = tmp_path / "child-exit-hook-ran"
    monkeypatch.setenv("PRIVMED_ONLY_IN_THE_TEST_PROCESS", "1")  # not in ENV
    monkeypatch.setitem(cli_run.ENV, "PRIVMED_GIVEN", "yes")
    cwd, filters = os.getcwd(), list(warnings.filters)
    handlers = list(logging.getLogger().handlers)

    def child() -> None:
        print(os.environ.get("PRIVMED_ONLY_IN_THE_TEST_PROCESS"), os.environ["PRIVMED_GIVEN"],
              os.getcwd(), repr(sys.stdin.read()))
        os.environ["PRIVMED_SET_BY_THE_CHILD"] = "1"
        os.chdir("/")
        cli_run.ENV["PRIVMED_SET_BY_THE_CHILD"] = "1"
        warnings.simplefilter("error")
        logging.getLogger().addHandler(logging.NullHandler())
        atexit.register(child_hook.touch)
        print("to stderr", file=sys.stderr)
        raise SystemExit(3)

    def warn() -> None:
        warnings.warn("shown as a new interpreter shows it", UserWarning, stacklevel=1)
        child()

    monkeypatch.setattr("privmed.cli.main", warn)
    atexit.register(parent_hook.touch)
    try:
        proc = privmed("models", cwd=tmp_path)
    finally:
        atexit.unregister(parent_hook.touch)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == f"None yes {tmp_path} ''\n"
    assert "UserWarning: shown as a new interpreter shows it" in proc.stderr  # not recorded
    assert proc.stderr.endswith("to stderr\n")
    assert child_hook.exists() and not parent_hook.exists()  # only the child's exit hooks
    assert "PRIVMED_SET_BY_THE_CHILD" not in os.environ
    assert "PRIVMED_SET_BY_THE_CHILD" not in cli_run.ENV
    assert os.getcwd() == cwd and warnings.filters == filters
    assert logging.getLogger().handlers == handlers


def test_an_uncaught_exception_is_a_traceback_and_exit_code_1(monkeypatch):
    def boom() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("privmed.cli.main", boom)
    proc = privmed("models")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.endswith("RuntimeError: a bug\n")


def test_from_another_thread_it_is_a_fresh_interpreter(monkeypatch):
    monkeypatch.setattr("privmed.cli.main", lambda: sys.exit(5))  # a fork would run this
    assert privmed("--help").returncode == 5
    done: list[subprocess.CompletedProcess] = []
    thread = threading.Thread(target=lambda: done.append(privmed("--help")))
    thread.start()
    thread.join(timeout=300)
    assert done[0].returncode == 0 and "Usage: python -m privmed" in done[0].stdout


def test_runs_with_the_same_python_and_module(tmp_path: Path):
    proc = privmed("--help", cwd=tmp_path)
    assert proc.args[:3] == [sys.executable, "-m", "privmed"]
    assert proc.returncode == 0 and "Usage: python -m privmed [OPTIONS] COMMAND" in proc.stdout
    with pytest.raises(FileNotFoundError):  # as subprocess.run: no such working directory
        privmed("--help", cwd=tmp_path / "missing")
