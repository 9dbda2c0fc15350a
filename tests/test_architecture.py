"""The shape of the package: each private module is a layer with a narrow seam to the others.

Read from the source with :mod:`ast`: no module imports another's private (underscore) names or
reaches into the private attributes of another layer's objects, and the modules import each other
without cycles.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

import aioipc

PACKAGE = Path(aioipc.__file__).parent

#: Known reaches into another layer's private attributes, as (module, attribute). None: every
#: layer talks to the others through public names.
ALLOWED_PRIVATE_ACCESS: set[tuple[str, str]] = set()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:`` (never run)."""
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            todo.extend(node.orelse)
            continue
        nodes.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _package_imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name) for each ``from .module import name``; (module, None) for ``from . import
    module``."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                found.extend((alias.name, None) for alias in node.names)
            else:
                found.extend((node.module, alias.name) for alias in node.names)
    return found


def _owned_private_names(tree: ast.Module) -> set[str]:
    """The private attribute names a module defines: in class bodies (methods, class attributes,
    ``__slots__``) and as ``self._name = ...``."""
    owned: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    owned.add(statement.name)
                targets: list[ast.expr] = []
                if isinstance(statement, ast.Assign):
                    targets = statement.targets
                elif isinstance(statement, ast.AnnAssign):
                    targets = [statement.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        owned.add(target.id)
                        if target.id == "__slots__":
                            owned.update(
                                constant.value
                                for constant in ast.walk(statement)
                                if isinstance(constant, ast.Constant)
                                and isinstance(constant.value, str)
                            )
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            owned.add(node.attr)
    return {name for name in owned if _is_private(name)}


def _foreign_private_accesses() -> set[tuple[str, str]]:
    """(module, attribute) for each ``obj._attr`` (``obj`` not ``self``, ``cls`` or ``super()``)
    where ``_attr`` is defined by another module of the package and not by this one."""
    owned = {name: _owned_private_names(tree) for name, tree in _modules().items()}
    found = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and ast.unparse(value.func) == "super":
                continue
            if node.attr in owned[name]:
                continue
            if any(node.attr in names for other, names in owned.items() if other != name):
                found.add((name, node.attr))
    return found


def test_no_module_imports_private_names_of_another() -> None:
    modules = set(_modules())
    offences = [
        f"{module}: from .{source} import {imported}"
        for module, tree in _modules().items()
        for source, imported in _package_imports(tree)
        if imported is not None and _is_private(imported)
    ]
    offences += [
        f"{module}: from . import {source} (not a module of the package)"
        for module, tree in _modules().items()
        for source, imported in _package_imports(tree)
        if imported is None and source not in modules
    ]
    assert offences == []


def test_no_module_reads_private_attributes_of_another_modules_module() -> None:
    modules = set(_modules())
    offences = []
    for module, tree in _modules().items():
        imported = {source for source, name in _package_imports(tree) if name is None}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported & modules
                and _is_private(node.attr)
            ):
                offences.append(f"{module}: {ast.unparse(node)}")
    assert offences == []


def test_no_layer_reaches_into_private_attributes_of_another_beyond_the_known_ones() -> None:
    assert _foreign_private_accesses() - ALLOWED_PRIVATE_ACCESS == set()


def test_every_allowed_reach_into_another_layer_still_exists() -> None:
    # Once supervision has a public seam, its entries leave the allow-list.
    assert ALLOWED_PRIVATE_ACCESS - _foreign_private_accesses() == set()


def test_modules_import_each_other_without_cycles() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, tree in _modules().items():
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is not None:
                    graph[module].add(node.module)
                else:
                    graph[module].update(alias.name for alias in node.names)
    graph.pop("__init__", None)  # the package re-exports everything: it is the top
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path, module))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
