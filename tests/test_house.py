"""House rules a reader relies on: library modules short enough to read in one sitting, and no
import cycles between them (counting imports inside functions, which only hide a cycle)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedpeat_jax"
MAX_LINES = 550  # "about 500": a module past this mixes topics and should be split along its seams


def module_files() -> dict:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(files: dict) -> dict:
    """{module: modules it imports anywhere in its file}; a module's own package is left out
    (importing a submodule runs its package's __init__ first, which is not a cycle)."""

    def resolve(name):
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedpeat_jax"):
                deps.update(resolve(f"{node.module}.{alias.name}") for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(resolve(alias.name) for alias in node.names if alias.name.startswith("fedpeat_jax"))
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph(module_files())) == []


def test_a_cycle_is_found():  # the check above can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(module_files()))
def test_library_modules_read_in_one_sitting(name):
    lines = len(module_files()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it along its seams"
