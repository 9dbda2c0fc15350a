"""Machine facts, the printed table (text or markdown), the JSON record of a run, and the
markdown table that the documentation's benchmarks page includes."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from ._suite import Row, Settings

#: The table of the latest full run, included by ``docs/benchmarks.md``.
DOCS_TABLE = Path(__file__).parent.parent / "docs" / "_generated" / "benchmarks-table.md"


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: the machine, the interpreter, the packages, the load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in ("aioipc", "anyio", "uvloop", "trio", "aioprocessing"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "load_average_at_start": os.getloadavg()[0],
    }


def _number(value: float, unit: str) -> str:
    if unit == "items/s":
        for scale, suffix in ((1e6, "M"), (1e3, "k")):
            if value >= scale:
                return f"{value / scale:.3g}{suffix}/s"
        return f"{value:.3g}/s"
    if unit == "x":  # two decimals, as the targets have: 0.87x, not a "0.9x" that missed 0.90x
        return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"
    if unit == "threads":
        return f"{value:+.0f} threads"
    sign = "+" if unit == "MB" and value < 0 else ""
    return f"{sign}{value:.3g} {unit}"


def _notes(row: Row) -> str:
    parts = []
    if "threads" in row.extra:
        parts.append(f"{row.extra['threads']:+.0f} threads")
    if "max_lag_ms" in row.extra:
        parts.append(f"max {row.extra['max_lag_ms']:.3g} ms")
    if "items_per_s" in row.extra:
        parts.append(_number(row.extra["items_per_s"], "items/s"))
    shares = [row.extra[key] for key in sorted(row.extra) if key.startswith("share_")]
    if shares:
        parts.append("jobs per worker " + "/".join(f"{share:.0f}" for share in shares))
    if row.note:
        parts.append(row.note)
    return ", ".join(parts)


def _cells(row: Row) -> list[str]:
    verdict = "" if row.met is None else ("met" if row.met else "MISSED")
    return [
        row.label,
        row.variant,
        "" if row.value is None else _number(row.value, row.unit),
        "" if row.ratio is None else f"{row.ratio:.2f}x",
        row.target or "",
        verdict,
        _notes(row),
    ]


HEADER = ["case", "variant", "median", "vs sync", "target", "result", "notes"]


def header_lines(
    facts: dict[str, Any], command: str, settings: Settings, seconds: float
) -> list[str]:
    packages = ", ".join(f"{name} {version}" for name, version in facts["packages"].items())
    load = f"load average {facts['load_average_at_start']:.2f} at start"
    if "load_average_at_end" in facts:
        load += f", {facts['load_average_at_end']:.2f} at end"
    return [
        f"aioipc benchmarks, {facts['date']}: `{command}`",
        f"{facts['cpu']}, {facts['cores']} cores ({facts['usable_cores']} usable), "
        f"{facts['platform']}, {facts['python']}",
        packages,
        f"median of {settings.rounds} alternated rounds, ~{settings.seconds:g} s per measurement, "
        f"{seconds:.0f} s in all; {load}; malloc thresholds "
        + ("fixed" if settings.steady_malloc else "adaptive (glibc default)"),
    ]


def text_table(rows: list[Row], header: list[str]) -> str:
    """A fixed-width table, one block per section."""
    cells = [HEADER] + [_cells(row) for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = [*header, ""]

    def fmt(values: list[str]) -> str:
        return "  ".join(v.ljust(wd) for v, wd in zip(values, widths, strict=True)).rstrip()

    lines.append(fmt(HEADER))
    section = None
    for row, row_cells in zip(rows, cells[1:], strict=True):
        if row.section != section:
            section = row.section
            lines += ["", section]
        lines.append(fmt(row_cells))
    return "\n".join(lines)


def markdown_table(rows: list[Row], header: list[str]) -> str:
    """The same table in markdown, one table per section (for the README)."""
    lines = [line + "  " for line in header]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += ["", f"**{section}**", "", "| " + " | ".join(HEADER) + " |"]
            lines.append("|" + "---|" * len(HEADER))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    return "\n".join(lines)


def write_json(
    path: Path,
    rows: list[Row],
    facts: dict[str, Any],
    command: str,
    settings: Settings,
    seconds: float,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "machine": facts,
        "settings": asdict(settings),
        "elapsed_seconds": round(seconds, 1),
        "rows": [asdict(row) for row in rows],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    if is_full_run(command) and DOCS_TABLE.parent.is_dir():
        write_docs_table(
            DOCS_TABLE, markdown_table(rows, header_lines(facts, command, settings, seconds))
        )
        print(f"table for the documentation written to {DOCS_TABLE}", file=sys.stderr)


def is_full_run(command: str) -> bool:
    """Whether ``command`` measured every case with full-length measurements (not ``--quick``,
    not ``--only``): only such a run replaces the documentation's table."""
    return not any(word.split("=", 1)[0] in ("--quick", "--only") for word in command.split()[1:])


def write_docs_table(path: Path, table: str) -> None:
    """Write the markdown ``table`` for the documentation's benchmarks page to ``path``."""
    path.write_text(
        "<!-- written by `python -m benchmarks` (benchmarks/_report.py): do not edit -->\n\n"
        + table
        + "\n"
    )


def read_json(path: Path) -> tuple[list[Row], list[str]]:
    """The rows and table header of a run written by :func:`write_json`."""
    record = json.loads(path.read_text())
    rows = [Row(**row) for row in record["rows"]]
    settings = Settings(**record["settings"])
    header = header_lines(record["machine"], record["command"], settings, record["elapsed_seconds"])
    return rows, header
