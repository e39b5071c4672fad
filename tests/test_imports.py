"""No import cycle among gaaf_patch's modules.

Each module's imports are read with ``ast`` (function-level ones included: an import inside a function is a
dependency too, only a late one), resolved to gaaf_patch modules, and the graph must be acyclic. An edge is what a
module names: ``from . import x`` is an edge to the module ``x`` (or to the package, for a name defined in its
``__init__``), ``from .a import b`` to ``a.b`` when that is a module, else to ``a``. The packages a module lives in,
which Python initialises first, are not edges: every module would then depend on ``gaaf_patch/__init__.py``, which
imports them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gaaf_patch

ROOT = Path(gaaf_patch.__file__).parent

# Cycles through modules whose owners have yet to break them: the set of the cycle's modules -> why it is there.
# test_no_import_cycle ignores these; test_known_cycles_are_real fails once one is gone, so the entry goes with it.
KNOWN: dict[frozenset[str], str] = {}


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {module of the package at ``root`` it imports: line of the first such import}."""
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, module, path.name == "__init__.py", modules):
                while target and target not in modules:  # gaaf_patch.x.name -> gaaf_patch.x
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[module] = edges
    return graph


def _components(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _cycle(graph: dict[str, dict[str, int]], component: set[str]) -> str:
    """One cycle through the component, spelled with the importing lines: ``a (a.py:3) -> b (b.py:9) -> a``."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth first: the shortest way back to start
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = paths[v] + [start]
                hops = [f"{a} (line {graph[a][b]}) -> " for a, b in zip(path, path[1:], strict=False)]
                return "".join(hops) + start
            if w in component and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError("not a cycle")


def test_the_graph_sees_function_level_relative_and_absolute_imports(tmp_path):
    files = {
        "pkg/__init__.py": "from . import a\nVERSION = 1\n",
        "pkg/a.py": "import os\nfrom .b import thing\n",
        "pkg/b.py": "thing = 1\n\n\ndef late():\n    from . import a\n    return a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import VERSION, a\nimport pkg.b\nfrom pkg.sub import d\n",
        "pkg/sub/d.py": "from ..b import late\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert graph == {
        "pkg": {"pkg.a": 1},
        "pkg.a": {"pkg.b": 2},
        "pkg.b": {"pkg.a": 5},  # inside a function
        "pkg.sub": {},
        "pkg.sub.c": {"pkg": 1, "pkg.a": 1, "pkg.b": 2, "pkg.sub.d": 3},
        "pkg.sub.d": {"pkg.b": 1},
    }
    (component,) = _components(graph)
    assert component == {"pkg.a", "pkg.b"}
    assert _cycle(graph, component) == "pkg.a (line 2) -> pkg.b (line 5) -> pkg.a"


def test_no_import_cycle():
    graph = import_graph()
    cycles = [c for c in _components(graph) if frozenset(c) not in KNOWN]
    assert not cycles, "import cycles among gaaf_patch modules (break each; a lower module must not import a " + (
        "higher one, even inside a function):\n  " + "\n  ".join(_cycle(graph, c) for c in cycles)
    )


def test_known_cycles_are_real():
    components = {frozenset(c) for c in _components(import_graph())}
    gone = [sorted(k) for k in KNOWN if k not in components]
    assert not gone, f"these cycles are gone: remove them from KNOWN in tests/test_imports.py: {gone}"
