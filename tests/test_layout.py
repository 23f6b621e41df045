"""The package's structure: no import cycles (lazy imports inside functions count too), and the solver
is pure math that imports nothing of the pipeline, the models or the files around it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sparsegpt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, importer: str) -> list[str]:
    """The project's modules that one import statement loads by name (a package's own ``__init__`` only
    when the statement names the package itself, or something defined in it)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    assert not node.level, f"{importer}: relative import (the package imports absolutely, as this graph reads)"
    base = node.module or ""
    if base not in MODULES:
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {target for node in ast.walk(tree) for target in _targets(node, name) if target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse(
        "def f():\n    from sparsegpt.formats import compact\n    from sparsegpt import data, __version__\n"
    )
    targets = {target for node in ast.walk(tree) for target in _targets(node, "sparsegpt.api")}
    assert targets == {"sparsegpt.formats.compact", "sparsegpt.data", "sparsegpt"}


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert len(graph) >= 20  # the walk found the package
    assert _cycles(graph) == []


def test_the_solver_imports_only_itself_and_the_error_type():
    allowed = {"sparsegpt.errors", "sparsegpt.solver"}
    for name, targets in import_graph().items():
        if name.startswith("sparsegpt.solver"):
            outside = {
                target for target in targets if not target.startswith("sparsegpt.solver") and target not in allowed
            }
            assert not outside, f"{name} imports {sorted(outside)}"
