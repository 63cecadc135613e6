"""The tutorials in docs/tutorials run top to bottom without an error, on this checkout's
privmed, each in a fresh folder with its own ledgers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))
KERNEL = "privmed-tutorial-test"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec of this interpreter, seeing this checkout's src first: whatever
    kernels the machine has installed, the notebooks test the code beside them."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "XDG_DATA_HOME": str(tmp_path / "xdg")}  # the per-user ledgers: this test's
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "privmed (test)", "language": "python", "env": env}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return KERNEL


def test_there_are_three_tutorials_stored_without_outputs():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01-", "02-", "03-"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, kernel, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # last, a probe: the kernel imported this checkout's privmed, not another installed one
    nb.cells.append(nbformat.v4.new_code_cell("import privmed; print(privmed.__file__)"))
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=300,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # CellExecutionError names the cell that raised
    assert str(ROOT / "src") in nb.cells[-1].outputs[0]["text"]
