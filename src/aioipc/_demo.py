"""The demo that ``python -m aioipc`` runs: real worker processes, async producers and consumers.

Worker processes square numbers they take from a jobs queue (synchronously, as ordinary worker code
does) and put the results on a results queue; the parent feeds jobs and collects results with
coroutines. Then a child process streams small items to the parent, read once with ``await
queue.get()`` and once with the plain blocking ``queue.sync.get()`` loop, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing
import os
import platform
import sys
import time
from typing import Any

import anyio

from ._exceptions import ShutDown
from ._process import open_process
from ._queue import Queue

#: The event loops the demo runs on, and the extra that installs each one (None: always there).
BACKENDS = {"asyncio": None, "uvloop": "uvloop", "trio": "trio"}


def square_jobs(jobs: Queue[int], results: Queue[tuple[int, int]]) -> None:
    """A worker process: square every job until the jobs queue is shut down."""
    while True:
        try:
            n = jobs.sync.get()
        except ShutDown:
            return
        results.sync.put((n, n * n))


def stream(queue: Queue[int], n: int) -> None:
    """A producer process: put ``n`` small ints, then shut the queue down."""
    for i in range(n):
        queue.sync.put(i)
    queue.shutdown()


async def run_workers(ctx: Any, n_workers: int, n_jobs: int) -> None:
    jobs: Queue[int] = Queue(ctx=ctx)
    results: Queue[tuple[int, int]] = Queue(ctx=ctx)
    async with jobs, results, contextlib.AsyncExitStack() as workers:
        for _ in range(n_workers):
            await workers.enter_async_context(open_process(square_jobs, jobs, results, ctx=ctx))
        started = time.perf_counter()
        total = 0

        async def feed() -> None:
            for n in range(n_jobs):
                await jobs.put(n)
            jobs.shutdown()

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            for _ in range(n_jobs):
                n, square = await results.get()
                assert square == n * n
                total += square
        elapsed = time.perf_counter() - started
    assert total == sum(n * n for n in range(n_jobs))
    print(
        f"jobs:       {n_jobs:,} numbers sent to {n_workers} worker processes, {n_jobs:,} squares "
        f"awaited in {elapsed:.2f} s ({n_jobs / elapsed:,.0f} round trips/s); sum checked"
    )


async def measure_stream(ctx: Any, n_items: int, *, use_async: bool) -> float:
    """Items per second from a producer child to this process (timed from the first item)."""
    queue: Queue[int] = Queue(ctx=ctx)
    async with queue, open_process(stream, queue, n_items, ctx=ctx):
        if use_async:
            first = await queue.get()
            started = time.perf_counter()
            count = 1
            async for _ in queue:
                count += 1
        else:
            first = queue.sync.get()
            started = time.perf_counter()
            count = 1
            try:
                while True:
                    queue.sync.get()
                    count += 1
            except ShutDown:
                pass
        elapsed = time.perf_counter() - started
    assert first == 0
    assert count == n_items
    return (n_items - 1) / elapsed


async def main(args: argparse.Namespace) -> None:
    ctx = multiprocessing.get_context(args.start_method)
    print(
        f"aioipc demo: Python {platform.python_version()}, {args.backend}, "
        f"start method {ctx.get_start_method()}, {os.cpu_count()} cores"
    )
    await run_workers(ctx, args.workers, args.jobs)
    rates: dict[bool, float] = {}
    for use_async in (True, False, True, False):  # alternate, so that drift hits both alike
        rate = await measure_stream(ctx, args.items, use_async=use_async)
        rates[use_async] = max(rate, rates.get(use_async, 0.0))
    print(f"stream:     {args.items:,} small ints from a child process to this one (best of 2)")
    print(f"  await queue.get()      {rates[True]:>12,.0f} items/s")
    print(f"  queue.sync.get() loop  {rates[False]:>12,.0f} items/s   (blocking, one item a call)")
    print(f"  async / sync           {rates[True] / rates[False]:>12.2f}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m aioipc", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=list(BACKENDS), default="asyncio")
    parser.add_argument(
        "--start-method", choices=multiprocessing.get_all_start_methods(), default=None
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=100_000)
    args = parser.parse_args(argv)
    extra = BACKENDS[args.backend]
    if extra is not None and importlib.util.find_spec(args.backend) is None:
        parser.error(
            f"--backend {args.backend} needs {args.backend}, which is not installed; install "
            f"aioipc's '{extra}' extra: pip install -e '.[{extra}]' in a clone of aioipc"
        )
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.backend == "uvloop":
        import uvloop

        anyio.run(
            main, args, backend="asyncio", backend_options={"loop_factory": uvloop.new_event_loop}
        )
    else:
        anyio.run(main, args, backend=args.backend)
