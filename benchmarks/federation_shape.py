"""The federation package's shape, measured: lines per folder, import circles, and a walk
of one secure distributed-DP round.

The walk runs one real round (3 in-process sites, secure aggregation, ``--dp distributed``)
under a tracer and lists privmed's functions in the order the round first calls them: the
order in which a reader following the round meets each function, reading each once. A
*stop* is a function in another file than the one before it; a *return* is a stop at a
file visited before. Fewer stops and returns mean a round that reads in one pass.
Protocol internals (``secagg/``) count as one file: they are one unit by design.

    python benchmarks/federation_shape.py
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "privmed"
FEDERATION = ROOT / "federation"


def lines_per_folder() -> dict[str, int]:
    out: Counter[str] = Counter()
    for path in FEDERATION.rglob("*.py"):
        rel = path.relative_to(FEDERATION)
        folder = str(rel.parent) if rel.parent != Path(".") else "(top)"
        out[folder] += len(path.read_text(encoding="utf-8").splitlines())
    return dict(sorted(out.items()))


def module_imports() -> dict[str, set[str]]:
    """privmed.federation module -> the privmed.federation modules it imports (at any
    depth of the file, function-local imports included)."""
    graph: dict[str, set[str]] = {}
    for path in FEDERATION.rglob("*.py"):
        name = "privmed." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("privmed.federation") and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


Walk = tuple[int, int, int, Counter[str]]


def walk_round(scope: Path = ROOT) -> tuple[Walk, Walk]:
    """(stops, returns, files, entries per file) of one secure distributed-DP round, for
    the whole round and for one node answering its training request."""
    import numpy as np

    from privmed.data import make_synthetic
    from privmed.federation import FederationConfig, InProcessTransport, SiteNode, run_federation

    def unit(filename: str) -> str | None:
        try:
            Path(filename).relative_to(scope)
            rel = Path(filename).relative_to(ROOT)
        except ValueError:
            return None
        return "federation/secagg/" if rel.parts[:2] == ("federation", "secagg") else str(rel)

    tmp = Path(tempfile.mkdtemp(prefix="privmed-shape-"))
    bundle = make_synthetic(n_train=360, n_val=60, n_test=60, seed=0)
    nodes = {}
    for i in range(3):
        part = bundle.train.subset(np.arange(i, len(bundle.train), 3))
        site = type(bundle)(train=part, val=None, test=None, source=f"site-{i + 1}")
        nodes[i + 1] = SiteNode(site, ledger=tmp / f"ledger-{i}.sqlite", budget_epsilon=50,
                                name=f"site-{i + 1}")
    job = FederationConfig(job_id="shape", model="scatter-linear", rounds=1, batch_size=64,
                           epsilon=8.0, dp="distributed", secure_agg=True)
    path: list[str] = []
    node_walk: dict = {"frame": None, "path": [], "done": False, "read": set()}
    read: set = set()

    def step(walk: list[str], seen: set, frame, where: str) -> None:  # noqa: ANN001
        if frame.f_code in seen:  # a function already read is not read again
            return
        seen.add(frame.f_code)
        if not walk or walk[-1] != where:
            walk.append(where)

    def tracer(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        where = unit(frame.f_code.co_filename)
        if where is None:
            return
        if event == "call":
            step(path, read, frame, where)
            if (frame.f_code.co_name == "handle_request" and not node_walk["done"]
                    and node_walk["frame"] is None
                    and isinstance(frame.f_locals.get("request"), dict)
                    and frame.f_locals["request"].get("kind", "train") == "train"):
                node_walk["frame"] = frame
            if node_walk["frame"] is not None:
                step(node_walk["path"], node_walk["read"], frame, where)
        elif event == "return" and frame is node_walk["frame"]:
            node_walk["frame"], node_walk["done"] = None, True

    sys.setprofile(tracer)
    try:
        run_federation(InProcessTransport(nodes), job, bundle.test, tmp / "out",
                       log=lambda _line: None, node_wait=5)
    finally:
        sys.setprofile(None)
    return _count(path), _count(node_walk["path"])


def _count(path: list[str]) -> tuple[int, int, int, Counter[str]]:
    seen: set[str] = set()
    returns = 0
    for where in path:
        returns += where in seen
        seen.add(where)
    return len(path), returns, len(seen), Counter(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    print("Lines per folder of src/privmed/federation:")
    total = 0
    for folder, count in lines_per_folder().items():
        print(f"  {folder:<14} {count:>6}")
        total += count
    print(f"  {'total':<14} {total:>6}")
    graph = module_imports()
    found = circles(graph)
    print(f"Import circles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    whole, node = walk_round()
    _, node_federation = walk_round(FEDERATION)
    for what, (stops, returns, files, entries) in (
            ("One secure distributed-DP round (3 sites, key set-up included)", whole),
            ("One node answering that round's first training request", node),
            ("The same, counting only files of privmed/federation", node_federation)):
        print(f"{what}: {stops} stops across {files} files, {returns} of them returns to a "
              "file already visited.")
        for where, count in entries.most_common(5):
            print(f"  {where:<28} entered {count} times")


if __name__ == "__main__":
    main()
