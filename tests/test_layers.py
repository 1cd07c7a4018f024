"""The architecture holds: the import-linter layers contract (pyproject.toml) names every module of
billing and workers, so none escapes `make lint`, and no module imports itself through others."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import grimp

import billing

ROOT = Path(__file__).resolve().parent.parent


def layered_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layers,) = [contract["layers"] for contract in contracts if contract["type"] == "layers"]
    return {name.strip() for layer in layers for name in layer.split("|")}


def test_every_top_level_module_is_in_a_layer() -> None:
    modules = {f"billing.{module.name}" for module in pkgutil.iter_modules(billing.__path__)}
    assert "billing.core" in modules  # the walk found the package
    assert modules - layered_modules() == set()


def test_the_layers_name_only_modules_that_exist() -> None:
    modules = {f"billing.{module.name}" for module in pkgutil.iter_modules(billing.__path__)}
    assert layered_modules() - modules == {"workers"}


def test_no_module_imports_itself_through_others() -> None:
    # import-linter's layers forbid cycles between packages; this also catches cycles inside a
    # package, including imports deferred into functions or kept under TYPE_CHECKING.
    graph = grimp.build_graph("billing", "workers")
    imports = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    assert imports["billing.app"]  # the graph was read
    assert cycles(imports) == []


def cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for imported in imports.get(module, ()):
            if imported not in order:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], order[imported])
        if low[module] == order[module]:
            component = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(imports):
        if module not in order:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
