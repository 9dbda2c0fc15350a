"""The README's examples run and print what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


#: The README's complete programs (its other code blocks are fragments).
EXAMPLES = [
    block
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    if 'if __name__ == "__main__":' in block
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("index", "expected"),
    [(0, "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n"), (1, "0\n1\n4\n"), (2, "4950\n")],
    ids=["queues", "pipes", "processes"],
)
def test_a_readme_example_runs(tmp_path: Path, index: int, expected: str) -> None:
    script = tmp_path / "example.py"
    script.write_text(EXAMPLES[index])
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert result.stderr == ""
