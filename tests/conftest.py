"""Suite-wide settings: one thread per process, and no process outlives its test."""

from __future__ import annotations

import os

# Several pytest workers and the processes they start share two cores: torch's OpenMP
# threads spin while they wait, so more threads than cores slows everything many times over.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import pytest  # noqa: E402
from flower_procs import reap  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None:
        reap(str(tmp))
