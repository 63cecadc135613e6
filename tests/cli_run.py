"""Run ``privmed`` as a user does and check its one-sentence errors; shared by the
command-line tests of every package.

Each call is a real, separate process with its own exit code, output and environment, but
not a fresh interpreter: a fresh ``python -m privmed`` spends about 9 CPU-seconds importing
torch, opacus, scipy and scikit-learn, and the suite runs ~300 of them. So the pytest worker
imports those once and ``privmed()`` forks a child that starts from there: it gets the
environment a subprocess would get (``ENV``), its own working directory, stdin from
/dev/null, stdout and stderr into files, the warnings filters, logging, signal handlers,
random seeds and exit hooks of a newly started interpreter, runs ``python -m privmed ARGS``
and leaves with ``os._exit``: nothing it does reaches the parent, and it never returns
into pytest.

Either way the call leads a process group of its own, which a timeout kills whole (a
command that started processes of its own leaves none behind), with the environment, kill
and reap of tests/procs.py, the tests' one way to run processes.

``PRIVMED_TEST_SUBPROCESS=1 pytest ...`` runs every such call as a fresh interpreter
(``subprocess.Popen``) instead: a periodic check that nothing passes only because the CLI
starts from an already-initialised process. Calls from a thread other than the main one
always do (forking while other threads run code of the caller's is not safe).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import faulthandler
import importlib
import locale
import logging
import os
import pickle
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from procs import ENV, kill, privmed_cmd, runs_cli

# Most of what a fresh `python -m privmed COMMAND` spends importing (``-X importtime``).
_HEAVY = ("torch", "opacus", "scipy.stats", "sklearn.model_selection", "privmed.cli")
_ROOT_LEVEL = logging.getLogger().level  # before any test's caplog
_startup_filters: list | None = None  # warnings.filters of a fresh interpreter, see _warm


def fresh_interpreter() -> bool:
    """Whether ``privmed()`` runs a new interpreter (``subprocess.Popen``), not a fork."""
    return (os.environ.get("PRIVMED_TEST_SUBPROCESS", "") not in ("", "0")
            or not hasattr(os, "fork")
            or threading.current_thread() is not threading.main_thread())


@runs_cli
def privmed(*args: str, cwd: Path | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    return run_cli(args, env=ENV, cwd=cwd, timeout=timeout)


@runs_cli
def run_cli(args: Sequence[str], env: Mapping[str, str], cwd: Path | str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, privmed, *args], capture_output=True, text=True, env=env,
    cwd=cwd, timeout=timeout)`` in a process group of its own, by fork unless
    ``fresh_interpreter()``; a timeout kills the group."""
    cmd = privmed_cmd(*args)
    env = dict(env)  # as it is now: the tests monkeypatch ENV
    if fresh_interpreter():
        return _run_fresh(cmd, env, cwd, timeout)
    if cwd is not None and not os.path.isdir(cwd):  # subprocess.run raises this too
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(cwd))
    _warm()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            # else the child could write out what the parent had buffered
            with contextlib.suppress(AttributeError, OSError, ValueError):
                stream.flush()
        pid = os.fork()
        if pid == 0:  # the child: never leaves this block but through os._exit
            code = 70  # the runner itself failed: not an exit code privmed uses
            try:
                os.setpgid(0, 0)  # as subprocess's process_group=0 does
                code = _child(list(args), env, cwd, out.fileno(), err.fileno())
            except BaseException:  # whatever happens, this process ends here
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
                    sys.stderr.flush()
            finally:
                os._exit(code)
        with contextlib.suppress(OSError):  # both set it: the parent must not kill too early
            os.setpgid(pid, pid)
        try:
            status = _wait(pid, timeout)
        except BaseException:
            kill(pid)
            raise
        if status is None:
            kill(pid)
            raise subprocess.TimeoutExpired(cmd, timeout, output=_read(out), stderr=_read(err))
        return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status),
                                           _read(out), _read(err))


def _run_fresh(cmd: list[str], env: dict[str, str], cwd: Path | str | None,
               timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` as a new process group, killed whole at the timeout."""
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                          process_group=0) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc.pid)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        except BaseException:
            kill(proc.pid)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _warm() -> None:
    """Import once in this process what every ``python -m privmed`` imports, with the
    environment of the CLI's processes (modules that read it at import see theirs)."""
    global _startup_filters
    if _startup_filters is not None:
        return
    probe = subprocess.run([sys.executable, "-c", "import pickle, sys, warnings; "
                            "sys.stdout.buffer.write(pickle.dumps(warnings.filters))"],
                           capture_output=True, env=ENV, check=True, timeout=120)
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(ENV)
        for name in _HEAVY:
            importlib.import_module(name)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _startup_filters = pickle.loads(probe.stdout)


def _wait(pid: int, timeout: float) -> int | None:
    """The child's wait status, or None if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): poll
        pidfd = None
    try:
        delay = 0.001
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read(file) -> str:
    """As ``subprocess.run(text=True)`` decodes: the locale's encoding, universal newlines."""
    file.seek(0)
    text = file.read().decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _child(args: list[str], env: dict[str, str], cwd: Path | str | None, out_fd: int,
           err_fd: int) -> int:
    """Make this forked process look like a newly started ``python -m privmed ARGS`` and run
    it; returns the exit code the interpreter would have."""
    import gc

    gc.freeze()  # the parent's objects: not scanned (nor copied on write) by this child's gc
    # The standard streams: /dev/null and the two files, at fd level (for C code and
    # subprocesses) and as new sys.std* objects (pytest's capture objects are gone).
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    parent_out, parent_err = sys.stdout, sys.stderr
    # Encoding and errors as this interpreter started with them (the same environment).
    std = {fd: open(fd, mode, encoding=getattr(like, "encoding", None) or "utf-8",  # noqa: SIM115
                    errors=getattr(like, "errors", None) or default_errors, newline="\n",
                    closefd=False, buffering=1 if fd == 2 else -1)
           for fd, mode, like, default_errors in (
               (0, "r", sys.__stdin__, "strict"), (1, "w", sys.__stdout__, "strict"),
               (2, "w", sys.__stderr__, "backslashreplace"))}
    sys.stdin = sys.__stdin__ = std[0]
    sys.stdout = sys.__stdout__ = std[1]
    sys.stderr = sys.__stderr__ = std[2]
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    _fresh_logging(parent_out, parent_err)
    _fresh_hooks()
    _fresh_consoles()
    _fresh_random(env)
    sys.argv = ["-m", *args]
    try:
        try:
            runpy.run_module("privmed", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # noqa: B036 - the interpreter's own last resort
            traceback.print_exc()
            code = 1
        # What the interpreter does on its way out: wait for non-daemon threads, run the
        # exit hooks registered in this process, flush.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _fresh_logging(parent_out, parent_err) -> None:
    """Drop pytest's handlers from the root logger; point handlers that libraries made at
    import to write to sys.stderr (or stdout) at this process's new streams."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(_ROOT_LEVEL)
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values()
                       if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler, logging.StreamHandler) or \
                    isinstance(handler, logging.FileHandler):
                continue
            stream = handler.stream
            to_stdout = stream is parent_out or getattr(stream, "name", None) == "<stdout>"
            if to_stdout or stream is parent_err or getattr(stream, "name", None) == "<stderr>" \
                    or type(stream).__module__.startswith("_pytest"):
                handler.stream = sys.stdout if to_stdout else sys.stderr


def _fresh_hooks() -> None:
    """Signals, warnings, exception hooks and exit hooks as a new interpreter has them."""
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(sig, signal.SIG_DFL)  # pytest's, faulthandler's, a test's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    faulthandler.cancel_dump_traceback_later()
    faulthandler.disable()
    if os.environ.get("PYTHONFAULTHANDLER"):
        faulthandler.enable()
    # pytest records warnings (and filters them per test); a new interpreter prints them.
    warnings.filters = list(_startup_filters or [])
    warnings.defaultaction = "default"
    warnings.onceregistry.clear()
    warnings._filters_mutated()  # type: ignore[attr-defined]
    warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]
    warnings._showwarnmsg_impl = _showwarnmsg_impl  # type: ignore[attr-defined]
    sys.excepthook = sys.__excepthook__
    sys.unraisablehook = sys.__unraisablehook__
    threading.excepthook = threading.__excepthook__
    # Exit hooks: the parent's (pytest's, conftest's rmtree of the data folder) are not
    # this process's; those a new interpreter registers at import are.
    atexit._clear()
    atexit.register(logging.shutdown)
    if "multiprocessing.util" in sys.modules:
        import multiprocessing.process
        import multiprocessing.util

        multiprocessing.process._children.clear()  # type: ignore[attr-defined]
        atexit.register(multiprocessing.util._exit_function)  # type: ignore[attr-defined]


def _showwarnmsg_impl(msg: warnings.WarningMessage) -> None:
    """``warnings._showwarnmsg_impl`` as the interpreter starts with it (pytest replaces it
    with a recorder while a test runs)."""
    file = msg.file if msg.file is not None else sys.stderr
    if file is None:
        return
    with contextlib.suppress(OSError):  # an invalid stderr: the warning is lost
        file.write(warnings._formatwarnmsg(msg))  # type: ignore[attr-defined]


def _fresh_consoles() -> None:
    """Rich reads COLUMNS / LINES / NO_COLOR when a Console is made, at import of privmed's
    modules in the parent: read them again from this process's environment."""
    console_type = getattr(sys.modules.get("rich.console"), "Console", None)
    if console_type is None:
        return
    for name, module in list(sys.modules.items()):
        if not name.startswith("privmed") or module is None:
            continue
        for value in vars(module).values():
            if isinstance(value, console_type):
                cols, lines = os.environ.get("COLUMNS", ""), os.environ.get("LINES", "")
                value._width = int(cols) if cols.isdigit() else None
                value._height = int(lines) if lines.isdigit() else None
                value.no_color = os.environ.get("NO_COLOR", "") != ""


def _fresh_random(env: Mapping[str, str]) -> None:
    """New seeds from the OS, as a new interpreter has (``random`` reseeds itself after a
    fork), and torch's thread count from the environment."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()
        threads = env.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()


def assert_one_sentence_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("Error:")
    for w in words:
        assert w in proc.stderr
