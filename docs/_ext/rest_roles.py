"""A griffe extension for the API reference: the docstrings as the source writes them.

The docstrings use reST roles (``:class:`aioipc.Queue```, ``:meth:`close```) and double
backticks. Double backticks are already a markdown code span; the roles become code spans too
(``:class:`~x.Y``` shows ``Y``), so that the reference reads as the source does. A first sentence
that wraps onto a second line is joined into one, so that the summary tables show all of it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|exc|obj|data|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def convert(text: str) -> str:
    """``text`` with every reST role written as a markdown code span, and its first paragraph
    on one line."""
    first, sep, rest = _ROLE.sub(_code, text).partition("\n\n")
    return " ".join(line.strip() for line in first.splitlines()) + sep + rest


def _walk(obj: griffe.Object | griffe.Alias, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if obj.is_alias:
        return  # converted where it is defined
    if obj.docstring is not None:
        obj.docstring.value = convert(obj.docstring.value)
    for member in obj.members.values():
        _walk(member, seen)


class RestRoles(griffe.Extension):
    """Rewrite the reST roles of every docstring in a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, set())
