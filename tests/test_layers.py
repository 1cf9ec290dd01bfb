"""The package layers: imports only point down (actors <- serve_app <- pipelines <- pipelines.cli)
and there is no import cycle, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("actors", "serve_app", "pipelines")
TOP = "pipelines.cli"


def rank(module: str) -> int:
    """0 for actors, 1 for serve_app, 2 for the pipelines, 3 for the command on top."""
    if module == TOP:
        return 3
    return PACKAGES.index(module.split(".")[0])


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its code (module level, functions, classes)."""
    known = {module_name(p) for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            # "from actors import storage" names the module actors.storage
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known and not name.endswith("__init__") and name not in PACKAGES:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = module_name(path)
            if name not in PACKAGES:
                graph[name] = project_imports(path) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_imports_only_point_down():
    upward = sorted(f"{source} imports {target}" for source, targets in import_graph().items()
                    for target in targets if rank(target) > rank(source))
    assert upward == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checks_catch_an_upward_import_and_a_cycle():
    # the same functions on a graph with a known violation, so the checks above can fail
    graph = {"actors.a": {"pipelines.p"}, "pipelines.p": {"actors.b"}, "actors.b": {"actors.a"}}
    assert find_cycle(graph) == ["actors.a", "pipelines.p", "actors.b", "actors.a"]
    assert rank("pipelines.p") > rank("actors.a")
    assert "pipelines.cli" in import_graph() and "actors.config" in import_graph()["pipelines.evaluate"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_seen(package):
    graph = import_graph()
    files = [module_name(p) for p in (REPO / package).rglob("*.py") if p.name != "__init__.py"]
    assert files and all(name in graph for name in files)
