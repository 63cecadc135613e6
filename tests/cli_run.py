"""Run ``privmed`` as a user does (a real subprocess) and check its one-sentence errors;
shared by the command-line tests of every package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "COLUMNS": "200", "PRIVMED_CACHE": ""}


def privmed(*args: str, cwd: Path | None = None, timeout: int = 600
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privmed", *args], capture_output=True,
                          text=True, cwd=cwd, env=ENV, timeout=timeout)


def assert_one_sentence_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("Error:")
    for w in words:
        assert w in proc.stderr
