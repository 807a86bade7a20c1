"""The operator package has no import cycles: data flows one way (handlers → drivers → core → adapters).

Every import counts, at module level, inside functions and under ``TYPE_CHECKING``: a lazy import hides a
cycle from the interpreter, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kiloclaw_operator

PACKAGE = "kiloclaw_operator"
ROOT = Path(kiloclaw_operator.__file__).parent


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([PACKAGE, *parts])] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    """module → the operator modules it imports (``from .x import y``: ``.x.y`` if a module, else ``.x``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package_of(module, path)
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                submodules = [f"{source}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in modules] or [source]
            for target in targets:
                if target in modules and target != module:
                    graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_the_graph_holds_function_level_imports() -> None:
    # run_operator imports handlers inside the function: the walk must see it, or a lazy cycle hides.
    assert f"{PACKAGE}.handlers" in import_graph()[f"{PACKAGE}.run"]


def test_no_module_of_the_operator_is_part_of_an_import_cycle() -> None:
    assert find_cycles(import_graph()) == []


def _external_imports(module: str) -> set[str]:
    path = _modules()[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


CORE_AND_DRIVERS = (
    "conditions",
    "driving",
    "observe.feed",
    "lifecycle",
    "models",
    "observe.polling",
    "observe.protocol",
    "observe.wiring",
    "ownership",
    "reconciler",
    "recovery",
    "retained",
    "adoption",
    "sandbox",
    "guards",
    "volumes",
)


@pytest.mark.parametrize("name", CORE_AND_DRIVERS)
def test_the_core_and_the_drivers_import_neither_httpx_nor_kopf(name: str) -> None:
    # The adapters (fly/, kube.py) translate their transport's errors; only handlers.py registers with kopf.
    assert _external_imports(f"{PACKAGE}.{name}") & {"httpx", "kopf"} == set()


@pytest.mark.parametrize("name", ["reconciler", "sandbox", "guards", "driving"])
def test_the_driver_knows_the_observer_only_by_its_protocol(name: str) -> None:
    # Polling and the feed are chosen and built by the wiring (observe/wiring.py); a driver sees the seam.
    imported = import_graph()[f"{PACKAGE}.{name}"]
    assert imported & {f"{PACKAGE}.observe.feed", f"{PACKAGE}.observe.polling"} == set()


def test_the_seam_check_sees_a_concrete_observer_where_one_is_imported() -> None:
    assert f"{PACKAGE}.observe.feed" in import_graph()[f"{PACKAGE}.observe.wiring"]


def test_leadership_only_elects() -> None:
    # The health endpoint, signal handling and the wiring of a run belong to the composition root (run.py).
    assert _external_imports(f"{PACKAGE}.leadership") & {"aiohttp", "signal", "kopf"} == set()
    assert import_graph()[f"{PACKAGE}.leadership"] <= {
        f"{PACKAGE}.config",
        f"{PACKAGE}.kube",
        f"{PACKAGE}.metrics",
    }


def test_the_handlers_build_nothing() -> None:
    # kopf's registrations reach what run.py built, through the memo: they make no client, observer or driver.
    imported = import_graph()[f"{PACKAGE}.handlers"]
    assert imported & {f"{PACKAGE}.observe.wiring", f"{PACKAGE}.fly", f"{PACKAGE}.brake"} == set()
