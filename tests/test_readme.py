"""Every ``python`` block of the README and of the documentation pages is a program that runs.

A block is a complete program unless the line before it says otherwise:

- ``<!-- fragment -->``: not a program (a signature, a few lines out of context); it must still
  compile, ``await`` and ``async with`` at top level allowed.

A program runs in a fresh interpreter with warnings as errors, must exit with code 0 and write
nothing to stderr. When a ``text`` block marked ``<!-- output -->`` follows it, that is what it
must print.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")
_FENCE = re.compile(r"^(\s*)```(\S*)")


@dataclass
class Block:
    """One fenced ``python`` block of a page."""

    page: Path
    line: int
    code: str
    markers: list[str] = field(default_factory=list)
    output: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def fragment(self) -> bool:
        return "fragment" in self.markers


def _fences(lines: list[str]) -> list[tuple[int, int, str, str]]:
    """(first line, closing line, language, indent) of every fenced block."""
    fences = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, language = match.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        fences.append((i, end, language, indent))
        i = end + 1
    return fences


def _marker_before(lines: list[str], index: int) -> str | None:
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    match = _MARKER.match(lines[j].strip()) if j >= 0 else None
    return match.group(1) if match else None


def blocks(page: Path) -> list[Block]:
    """The ``python`` blocks of ``page``, with their markers and expected output."""
    lines = page.read_text().splitlines()
    fences = _fences(lines)
    found = []
    for n, (start, end, language, indent) in enumerate(fences):
        if language != "python":
            continue
        assert not indent, f"{page.name}:{start + 1}: an indented python block is not run"
        marker = _marker_before(lines, start)
        block = Block(page, start + 1, "\n".join(lines[start + 1 : end]) + "\n")
        if marker is not None:
            block.markers = [m.strip() for m in marker.split(";")]
        if n + 1 < len(fences):
            o_start, o_end, o_language, _ = fences[n + 1]
            if o_language == "text" and _marker_before(lines, o_start) == "output":
                block.output = "\n".join(lines[o_start + 1 : o_end]) + "\n"
        found.append(block)
    return found


ALL = [block for page in PAGES for block in blocks(page)]
PROGRAMS = [block for block in ALL if not block.fragment]
FRAGMENTS = [block for block in ALL if block.fragment]


def test_the_readme_and_the_pages_have_programs() -> None:
    assert any(block.page.name == "README.md" for block in PROGRAMS)
    assert len({block.page for block in PROGRAMS}) > 3


def test_every_marker_is_known() -> None:
    for block in ALL:
        for marker in block.markers:
            assert marker == "fragment", (block.id, marker)


@pytest.mark.parametrize("block", FRAGMENTS, ids=[b.id for b in FRAGMENTS])
def test_a_fragment_compiles(block: Block) -> None:
    compile(block.code, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("block", PROGRAMS, ids=[b.id for b in PROGRAMS])
def test_a_program_runs(block: Block, tmp_path: Path) -> None:
    compile(block.code, block.id, "exec")
    assert 'if __name__ == "__main__":' in block.code, "a program guards its entry point"
    script = tmp_path / "example.py"
    script.write_text(block.code)
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            # as in pyproject's filterwarnings: forking while threads run is done on purpose
            "-W",
            "ignore:This process:DeprecationWarning",
            str(script),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if block.output is not None:
        assert result.stdout == block.output
