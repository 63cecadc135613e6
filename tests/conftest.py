"""Suite-wide settings: one thread per process, no process outlives its test, none
writes into the user's real per-user data folder (privmed's default ledger location), and
tests that start long-lived processes or servers are marked ``processes``, those that run
the CLI ``cli`` (both left out of ``make test-fast``)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Several pytest workers and the processes they start share two cores: torch's OpenMP
# threads spin while they wait, so more threads than cores slows everything many times over.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
# privacy.ledger_home: federate/simulate keep site ledgers under XDG_DATA_HOME by default.
# Set before procs copies os.environ for the processes the tests start.
_DATA_HOME = tempfile.mkdtemp(prefix="privmed-test-xdg-")
os.environ["XDG_DATA_HOME"] = _DATA_HOME
atexit.register(shutil.rmtree, _DATA_HOME, ignore_errors=True)

import inspect  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import cli_run  # noqa: E402
import procs  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _own_data_home(tmp_path_factory, monkeypatch):
    """Each test its own per-user data folder: site ledgers there are keyed to the data, and
    two tests federating the same synthetic sites must not spend each other's budget."""
    home = str(tmp_path_factory.mktemp("xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", home)
    monkeypatch.setitem(procs.ENV, "XDG_DATA_HOME", home)  # copied from os.environ at import


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None:
        procs.reap(str(tmp))


# The files that wait longest on processes go first: pytest-xdist hands out files in
# collection order, and a long file started last would stretch the run by its length.
_LONG_FIRST = ("test_network_namespaces.py", "test_flower_federate.py", "test_flower_tls.py",
               "test_flower_distributed.py", "test_network_attacks.py", "test_he_cli.py",
               "test_audit_cli.py", "test_cli_end_to_end.py", "test_server_bodies.py")


def pytest_report_header(config):
    how = ("a fresh interpreter each (PRIVMED_TEST_SUBPROCESS=1)" if cli_run.fresh_interpreter()
           else "forked from the test's process (PRIVMED_TEST_SUBPROCESS=1: fresh interpreters)")
    return f"privmed CLI calls: {how}"


# Markers from what a test uses, in its body, in a fixture of the tests, or in a function or
# class of its own file that it calls: ``processes`` for these names (the standard
# library's and privmed's starters of long-lived processes and servers, and a browser),
# and the markers of helpers of other test modules tagged with ``procs.marks_tests``:
# ``processes`` (Flower runs, ``privmed serve``, racing processes), ``cli`` (one-shot CLI
# calls through tests/cli_run.py).
_STARTER_NAMES = frozenset({"Popen", "ProcessGroup", "start_server_process", "Chrome"})
_TESTS = str(Path(__file__).parent)


def _markers_of(code: types.CodeType, names: dict, seen: set) -> set[str]:
    if code in seen:
        return set()
    seen.add(code)
    found = {"processes"} if _STARTER_NAMES.intersection(code.co_names) else set()
    objs = [names.get(name) for name in code.co_names]
    # a helper module of the tests (``procs.start``): its attributes named here
    objs += [getattr(module, name, None) for module in objs if inspect.ismodule(module)
             and (getattr(module, "__file__", None) or "").startswith(_TESTS)
             for name in code.co_names]
    for obj in objs:
        tags = getattr(obj, "test_markers", None)
        if isinstance(tags, frozenset):
            found |= tags
        if inspect.isclass(obj):
            members = [m for m in vars(obj).values() if inspect.isfunction(m)]
        else:
            members = [obj] if inspect.isfunction(obj) else []
        for fn in members:
            if fn.__code__.co_filename == code.co_filename:
                found |= _markers_of(fn.__code__, fn.__globals__, seen)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _markers_of(const, names, seen)
    return found


def _markers(item: pytest.Item) -> set[str]:
    seen: set = set()
    obj = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
    functions = [obj] if inspect.isfunction(obj) else []
    for defs in item._fixtureinfo.name2fixturedefs.values():
        fn = inspect.unwrap(getattr(defs[-1].func, "__func__", defs[-1].func))
        if inspect.isfunction(fn) and fn.__code__.co_filename.startswith(_TESTS):
            functions.append(fn)
    found: set[str] = set()
    for fn in functions:
        tags = getattr(fn, "test_markers", None)
        found |= tags if isinstance(tags, frozenset) else set()
        found |= _markers_of(fn.__code__, fn.__globals__, seen)
    return found


def pytest_collection_modifyitems(items):
    for item in items:
        for name in sorted(_markers(item)):
            item.add_marker(name)
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept

