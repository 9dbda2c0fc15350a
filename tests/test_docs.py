"""What the documentation promises about the project's commands: the demo and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _report

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("backend", ["trio", "uvloop"])
def test_the_demo_refuses_a_missing_event_loop_naming_the_extra_to_install(backend: str) -> None:
    # The package is made unimportable, as it is after the quick start's plain install.
    code = f"import sys; sys.modules[{backend!r}] = None; import runpy; "
    code += "sys.argv = ['aioipc', '--backend', " + repr(backend) + "]; "
    code += "runpy.run_module('aioipc', run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"pip install -e '.[{backend}]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "full"),
    [
        ("python -m benchmarks", True),
        ("python -m benchmarks --rounds 5", True),
        ("python -m benchmarks --quick", False),
        ("python -m benchmarks --only 64 KiB", False),
        ("python -m benchmarks --only=Round", False),
    ],
)
def test_only_a_full_benchmark_run_replaces_the_documentation_table(
    command: str, full: bool
) -> None:
    assert _report.is_full_run(command) is full


def test_the_benchmark_table_is_written_where_the_benchmarks_page_includes_it(
    tmp_path: Path,
) -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    included = _report.DOCS_TABLE.relative_to(ROOT / "docs").as_posix()
    assert f'--8<-- "{included}"' in page
    assert _report.DOCS_TABLE.is_file()
    target = tmp_path / "table.md"
    _report.write_docs_table(target, "aioipc benchmarks, ...\n\n| case |\n|---|")
    text = target.read_text()
    assert text.startswith("<!-- written by `python -m benchmarks`")
    assert text.endswith("| case |\n|---|\n")


def test_the_readme_stays_short_and_leaves_the_detail_to_the_docs() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220
    assert "docs/benchmarks.md" in "\n".join(lines)
