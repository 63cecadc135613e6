"""Suite-wide settings: one thread per process, no process outlives its test, and none
writes into the user's real per-user data folder (privmed's default ledger location)."""

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
# Set before flower_procs copies os.environ for the processes the tests start.
_DATA_HOME = tempfile.mkdtemp(prefix="privmed-test-xdg-")
os.environ["XDG_DATA_HOME"] = _DATA_HOME
atexit.register(shutil.rmtree, _DATA_HOME, ignore_errors=True)

import cli_run  # noqa: E402
import flower_procs  # noqa: E402
import pytest  # noqa: E402
from flower_procs import reap  # noqa: E402


@pytest.fixture(autouse=True)
def _own_data_home(tmp_path_factory, monkeypatch):
    """Each test its own per-user data folder: site ledgers there are keyed to the data, and
    two tests federating the same synthetic sites must not spend each other's budget."""
    home = str(tmp_path_factory.mktemp("xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", home)
    for env in (flower_procs.ENV, cli_run.ENV):  # copied from os.environ at import
        monkeypatch.setitem(env, "XDG_DATA_HOME", home)


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None:
        reap(str(tmp))


# The files that wait longest on processes go first: pytest-xdist hands out files in
# collection order, and a long file started last would stretch the run by its length.
_LONG_FIRST = ("test_network_namespaces.py", "test_flower_federate.py", "test_flower_tls.py",
               "test_flower_distributed.py", "test_network_attacks.py", "test_he_cli.py",
               "test_audit_cli.py", "test_cli_end_to_end.py", "test_server_bodies.py")


def pytest_report_header(config):
    how = ("a fresh interpreter each (PRIVMED_TEST_SUBPROCESS=1)" if cli_run.fresh_interpreter()
           else "forked from the test's process (PRIVMED_TEST_SUBPROCESS=1: fresh interpreters)")
    return f"privmed CLI calls: {how}"


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept

