"""Fan out to worker processes, fan back in to a nursery of trio tasks.

A trio task feeds numbers into a jobs queue; worker processes take them, compute the length of
their Collatz sequence and put the answers into a results queue, which a nursery of consumer tasks
shares. Shutdown ripples through: the feeder shuts the jobs queue down when it has put everything,
the workers exit once it is drained, and when the last worker has exited the results queue is shut
down in turn, which ends the consumers' ``async for`` loops.

    python examples/trio_fanout.py [--start-method fork|forkserver|spawn] [--workers N]
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections import Counter
from contextlib import AsyncExitStack
from multiprocessing.context import BaseContext

import trio

import aioipc

NUMBERS = range(1, 31)
CONSUMERS = ("consumer-a", "consumer-b", "consumer-c")

Result = tuple[str, int, int]  # (worker name, n, steps)


def collatz_steps(n: int) -> int:
    """How many steps of n -> n/2 (n even) or 3n+1 (n odd) it takes to reach 1."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def worker(jobs: aioipc.Queue[int], results: aioipc.Queue[Result]) -> None:
    """Runs in each worker process: synchronous code, so it uses the queues' blocking faces."""
    name = multiprocessing.current_process().name
    try:
        while True:
            try:
                n = jobs.sync.get()
            except aioipc.ShutDown:
                break
            results.sync.put((name, n, collatz_steps(n)))
    finally:
        jobs.close()
        results.close()


async def feed(jobs: aioipc.Queue[int]) -> None:
    """Put every number, then tell the workers there is nothing more to come."""
    for n in NUMBERS:
        await jobs.put(n)
    jobs.shutdown()


async def end_results_after(workers: list[aioipc.Process], results: aioipc.Queue[Result]) -> None:
    """Shut the results queue down once every worker has exited: no more results can come."""
    for process in workers:
        await process.wait()
    results.shutdown()


async def consume(name: str, results: aioipc.Queue[Result], tally: Counter[str]) -> None:
    """One of the consumer tasks: they share the results queue, each result goes to one of them."""
    async for worker_name, n, steps in results:
        print(f"{name} got {n} -> 1 in {steps} steps from {worker_name}", flush=True)
        tally[name] += 1
        await trio.sleep(0.01)  # some async work per result


async def run(ctx: BaseContext, n_workers: int) -> None:
    """The main task: start the workers and the nursery, wait for it all to end."""
    tally: Counter[str] = Counter()
    async with (
        aioipc.Queue[int](ctx=ctx) as jobs,
        aioipc.Queue[Result](ctx=ctx) as results,
        AsyncExitStack() as stack,
    ):
        workers = [
            # Each worker is awaited when the stack closes (before the queues are closed); if
            # anything fails, the workers are terminated instead.
            await stack.enter_async_context(
                aioipc.open_process(worker, jobs, results, ctx=ctx, name=f"worker-{i}")
            )
            for i in range(1, n_workers + 1)
        ]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed, jobs)
            nursery.start_soon(end_results_after, workers, results)
            for name in CONSUMERS:
                nursery.start_soon(consume, name, results, tally)
    shares = ", ".join(f"{name} {tally[name]}" for name in CONSUMERS)
    print(f"consumed {tally.total()} results ({shares})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods())
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    trio.run(run, multiprocessing.get_context(args.start_method), args.workers)


if __name__ == "__main__":
    main()
