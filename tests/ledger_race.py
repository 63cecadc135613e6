"""Two processes racing for the last of a budget: each waits until both are ready, then
both reserve at once; shared by the ledger tests of records and of datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import starts_processes, wait_until


@starts_processes
def race(script: str, folder: Path, rounds: int, names: tuple[str, ...] = ("x", "y")
         ) -> dict[int, list[str]]:
    """Run ``script`` (argv: folder, name, rounds) once per name; per round, what each
    racer printed (``[round, outcome]`` JSON lines), e.g. ``["ok", "refused"]``."""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(folder), me, str(rounds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in names]

    def ready(k: int) -> bool:
        return all((folder / f"ready-{k}-{me}").exists() for me in names)

    def all_ready(k: int) -> bool:
        try:  # starting Python + torch on a loaded machine; a racer may also stop early
            wait_until(lambda: ready(k) or any(p.poll() is not None for p in procs), 240,
                       f"both racers to be ready for round {k}", interval=0.005)
        except AssertionError:
            return False
        return ready(k)

    outputs = []
    try:
        started = all(all_ready(k) and (folder / f"go-{k}").touch() is None
                      for k in range(rounds))  # both wait, then both go at once
        if started:
            outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:  # a racer that crashed must not leave the other waiting
            p.kill()
    if not started:
        errors = [p.communicate()[1] for p in procs]
        pytest.fail(f"a racer stopped early: {errors}")
    results: dict[int, list[str]] = {k: [] for k in range(rounds)}
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        for line in out.splitlines():
            k, outcome = json.loads(line)
            results[k].append(outcome)
    return results
