"""Run the benchmark suite: ``python -m benchmarks [--quick] [--only TEXT] [--markdown]``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import _report, _suite

RESULTS = Path(__file__).parent / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="aioipc against the synchronous loop on the same channel, and its peers.",
    )
    parser.add_argument("--quick", action="store_true", help="short measurements (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per figure (>= 3)")
    parser.add_argument(
        "--only", action="append", default=[], metavar="TEXT",
        help="run only the cases whose title or payload contains TEXT (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--adaptive-malloc", action="store_true",
        help="keep glibc's adaptive malloc thresholds (figures for large items then depend on "
        "the cases run before them)",
    )  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="print the table of an earlier run, run nothing"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})"
    )
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: every figure is a median of alternated runs")

    table = _report.markdown_table if args.markdown else _report.text_table
    if args.render is not None:
        rows, header = _report.read_json(args.render)
        print(table(rows, header))
        return 0

    from . import _measure

    steady = not args.adaptive_malloc and _measure.steady_allocator()
    settings = _suite.Settings(
        rounds=args.rounds, seconds=0.1 if args.quick else 0.35, steady_malloc=steady
    )
    groups = [
        g
        for g in _suite.all_groups()
        if not args.only or any(t.lower() in f"{g.section} {g.label}".lower() for t in args.only)
    ]
    command = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
    facts = _report.machine_facts()
    started = time.monotonic()
    rows = _suite.run(groups, settings)
    elapsed = time.monotonic() - started
    facts["load_average_at_end"] = os.getloadavg()[0]
    print(table(rows, _report.header_lines(facts, command, settings, elapsed)))
    _report.write_json(args.output, rows, facts, command, settings, elapsed)
    print(f"\nwritten to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
