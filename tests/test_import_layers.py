"""The package's shape holds: the federation's node side and coordinator side never import
each other, nothing in privmed imports in a circle, and the ClientApp's modules stay free
of torch. Read from the source (every import, function-local ones included), so a circle
hidden in a function fails here as a top-level one would."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "privmed"
sys.path.insert(0, str(ROOT.parents[1] / "benchmarks"))

from federation_shape import circles  # noqa: E402 - the benchmark's own Tarjan


def _module(path: Path) -> str:
    return "privmed." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(
        ".__init__")


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never imported at run time)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            out.update(id(n) for child in node.body for n in ast.walk(child))
    return out


def _imports() -> dict[str, set[str]]:
    """module -> the privmed modules it imports, bar its own package's ``__init__`` (a
    package that re-exports its modules is not a circle)."""
    graph: dict[str, set[str]] = {}
    modules = {_module(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        name = _module(path)
        deps = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hidden = _type_checking_blocks(tree)
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                # `from privmed.x import y` where y is a module
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        parents = {name.rsplit(".", k)[0] for k in range(1, name.count("."))}
        graph[name] = {d for d in deps if d in modules and d != name and d not in parents}
    return graph


def test_node_and_coordinator_never_import_each_other():
    graph = _imports()
    sides = {"node": "privmed.federation.node", "coordinator": "privmed.federation.coordinator"}
    for side, prefix in sides.items():
        other = sides["coordinator" if side == "node" else "node"]
        crossing = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith(prefix)
                          for d in deps if d.startswith(other))
        assert not crossing, f"the {side} side imports the other side: {crossing}"


def test_shared_vocabulary_imports_neither_side_nor_the_runtime():
    graph = _imports()
    for shared in ("privmed.federation.messages", "privmed.federation.config"):
        bad = sorted(d for d in graph[shared] if d.startswith((
            "privmed.federation.node", "privmed.federation.coordinator",
            "privmed.federation.runtime")))
        assert not bad, f"{shared} imports {bad}"


# report/: the page's sections import html.py's helpers and html.py imports the sections
# lazily (and results.py / its schema checks likewise); known, to be split into leaf
# helper modules. It may not grow, and no other circle may appear.
_KNOWN = {"privmed.report.external", "privmed.report.federated", "privmed.report.html",
          "privmed.report.metrics_html", "privmed.report.metrics_schema",
          "privmed.report.privacy_unit", "privmed.report.results"}


def test_no_module_imports_in_a_circle():
    found = circles(_imports())
    assert all(set(group) <= _KNOWN for group in found), f"import circles: {found}"
    federation = [g for g in circles(_imports()) if any("federation" in m for m in g)]
    assert not federation


@pytest.mark.parametrize("module", ["privmed.federation.runtime.flower",
                                    "privmed.federation.node.worker",
                                    "privmed.federation.messages"])
def test_the_client_apps_modules_do_not_import_torch(module):
    # Flower starts a fresh ClientApp process per message: torch would cost seconds each.
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
