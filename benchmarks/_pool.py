"""Worker pools for async servers: aioipc's pool against what users pick instead.

Trivial jobs (``noop(i)`` returns ``i``) run on the same number of worker processes in each pool,
started before the clock starts and warmed up; ``in_flight`` tasks each await one job after another
until ``n`` jobs are done. The figure is jobs per second; the extras are the p50 and p99 latency of
a job as its caller sees it. Separately, the time from a busy worker's SIGKILL to the moment its
caller holds :class:`aioipc.WorkerDied`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import anyio

import aioipc

from . import _measure as m
from . import _workers as w
from ._measure import Sample
from ._suite import Comparison, Group, Target, Variant

#: Worker processes in every pool.
WORKERS = 2
IN_FLIGHT = (1, 16, 256)


def noop(i: int) -> int:
    return i


async def anoop(i: int) -> int:  # aiomultiprocess runs coroutine functions only
    return i


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _drive(call: Callable[[int], Awaitable[Any]], in_flight: int, n: int) -> Sample:
    latencies: list[float] = []
    jobs = iter(range(n))

    async def caller() -> None:
        for i in jobs:
            start = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - start)

    for i in range(4 * WORKERS):  # warm up: every worker has run a job
        await call(i)
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(in_flight):
            tg.start_soon(caller)
    seconds = time.perf_counter() - start
    extra = {
        "p50_us": _percentile(latencies, 0.50) * 1e6,
        "p99_us": _percentile(latencies, 0.99) * 1e6,
    }
    return Sample(n / seconds, n, seconds, extra)


def jobs(variant: str, in_flight: int, n: int) -> Sample:
    """Jobs per second of ``variant`` with ``in_flight`` callers."""
    n = max(n, in_flight)
    with m.deadline():
        if variant.startswith("aioipc"):
            loop = variant.split()[-1]

            async def run_pool() -> Sample:
                async with aioipc.open_pool(WORKERS, ctx=m.CTX) as pool:
                    return await _drive(partial(pool.run, noop), in_flight, n)

            return w.run_on(loop, run_pool)
        if variant == "executor":

            async def run_executor() -> Sample:
                loop = asyncio.get_running_loop()
                with ProcessPoolExecutor(WORKERS, mp_context=m.CTX) as executor:

                    async def call(i: int) -> int:
                        return await loop.run_in_executor(executor, noop, i)

                    return await _drive(call, in_flight, n)

            return w.run_on("asyncio", run_executor)
        if variant == "anyio":
            import anyio.to_process

            async def run_anyio() -> Sample:
                limiter = anyio.CapacityLimiter(WORKERS)

                async def call(i: int) -> int:
                    return await anyio.to_process.run_sync(noop, i, limiter=limiter)

                try:
                    return await _drive(call, in_flight, n)
                finally:  # end its workers while the loop that watches them runs
                    workers = anyio.to_process._process_pool_workers.get(set())
                    for process in list(workers):
                        process.kill()
                        await process.aclose()

            # anyio's workers run the parent's main module by path: for ``python -m benchmarks``
            # that is a package's __main__.py, whose relative imports fail there. They need none.
            main = sys.modules["__main__"]
            path = getattr(main, "__file__", None)
            if getattr(main, "__package__", None):
                main.__file__ = None
            try:
                return w.run_on("asyncio", run_anyio)
            finally:
                if path is not None:
                    main.__file__ = path
        if variant == "aiomultiprocess":
            import aiomultiprocess

            async def run_aiomultiprocess() -> Sample:
                async with aiomultiprocess.Pool(WORKERS) as pool:

                    async def call(i: int) -> int:
                        result: int = await pool.apply(anoop, (i,))
                        return result

                    return await _drive(call, in_flight, n)

            return w.run_on("asyncio", run_aiomultiprocess)
    raise ValueError(f"unknown variant {variant!r}")


_report: Any = None


def _remember(event: Any) -> None:
    global _report
    _report = event


def block_until_killed() -> None:
    _report.set()
    signal.pause()


def death_to_exception(loop: str, n: int) -> Sample:
    """Milliseconds from a busy worker's SIGKILL to its caller's ``WorkerDied`` (median of n)."""
    event = m.CTX.Event()
    delays: list[float] = []

    async def main() -> None:
        async with aioipc.open_pool(1, ctx=m.CTX, initializer=_remember, initargs=(event,)) as pool:
            for _ in range(n):
                event.clear()
                pid = pool.pids[0]
                outcome: list[float] = []

                async def victim(outcome: list[float] = outcome) -> None:
                    try:
                        await pool.run(block_until_killed)
                    except aioipc.WorkerDied:
                        outcome.append(time.perf_counter())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(victim)
                    await anyio.to_thread.run_sync(event.wait)
                    killed = time.perf_counter()
                    os.kill(pid, signal.SIGKILL)
                assert outcome, "the caller did not get WorkerDied"
                delays.append(outcome[0] - killed)
                with anyio.fail_after(10):
                    while not pool.pids or pool.pids[0] == pid:
                        await anyio.sleep(0.001)

    start = time.perf_counter()
    with m.deadline():
        w.run_on(loop, main)
    seconds = time.perf_counter() - start
    delays.sort()
    return Sample(delays[len(delays) // 2] * 1e3, n, seconds, {"max_ms": delays[-1] * 1e3})


def pool_groups() -> list[Group]:
    """Jobs/s at 1, 16 and 256 jobs in flight; p50/p99 latency; worker death to exception."""
    names = {
        "executor": "loop.run_in_executor(ProcessPoolExecutor)",
        "aioipc asyncio": "await pool.run(), asyncio",
        "aioipc uvloop": "await pool.run(), uvloop",
        "aioipc trio": "await pool.run(), trio",
        "anyio": "anyio.to_process.run_sync",
        "aiomultiprocess": "aiomultiprocess.Pool.apply",
    }
    groups = []
    for in_flight in IN_FLIGHT:
        variants = [
            Variant(
                key,
                name,
                partial(jobs, key, in_flight),
                expect=2.0 if key.startswith("aioipc") else 1.0,
                target=Target("ratio", ">=", 3.0)
                if key.startswith("aioipc") and in_flight == 256
                else None,
            )
            for key, name in names.items()
        ]
        comparisons = [
            Comparison(
                f"p50 latency, {name} / anyio.to_process.run_sync",
                key,
                "anyio",
                "ratio",
                Target("ratio", "<=", 1.0) if in_flight == 1 else None,
                metric="p50_us",
            )
            for key, name in names.items()
            if key.startswith("aioipc")
        ]
        groups.append(
            Group(
                f"Pool: trivial jobs on {WORKERS} worker processes, jobs/s (ratio to the executor)",
                f"{in_flight} in flight",
                "jobs/s",
                variants,
                5_000,
                min_n=200,
                comparisons=comparisons,
            )
        )
    groups.append(
        Group(
            "Pool: a busy worker's SIGKILL to its caller's WorkerDied (median)",
            "1 worker",
            "ms",
            [
                Variant(loop, f"await pool.run(), {loop}", partial(death_to_exception, loop))
                for loop in ("asyncio", "uvloop", "trio")
            ],
            10,
            baseline=False,
            adaptive=False,
        )
    )
    return groups
