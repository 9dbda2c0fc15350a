"""The public surface: what ``aioipc`` exports, and how its objects present themselves."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import aioipc


def test_all_lists_exactly_the_names_imported_in_init() -> None:
    tree = ast.parse(Path(aioipc.__file__).read_text())
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert sorted(aioipc.__all__) == sorted(imported)
    assert aioipc.__all__ == sorted(aioipc.__all__)


def test_every_export_is_reexported_with_an_explicit_alias() -> None:
    tree = ast.parse(Path(aioipc.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert all(alias.asname == alias.name for alias in node.names), ast.unparse(node)


def test_public_classes_present_themselves_as_aioipc_names() -> None:
    for name in aioipc.__all__:
        obj = getattr(aioipc, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "aioipc", name


def test_every_export_has_a_docstring() -> None:
    for name in aioipc.__all__:
        assert inspect.getdoc(getattr(aioipc, name)), name


def test_the_package_is_marked_as_typed() -> None:
    assert (Path(aioipc.__file__).parent / "py.typed").is_file()


def test_queue_repr_names_the_public_class() -> None:
    queue: aioipc.Queue[int] = aioipc.Queue(3)
    try:
        assert repr(queue).startswith("<aioipc.Queue maxsize=3 qsize=0")
    finally:
        queue.close()
    assert "closed" in repr(queue)
