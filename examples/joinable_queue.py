"""A JoinableQueue: worker processes mark each task done, an async producer awaits ``join()``.

The producer coroutine puts a batch of tasks, waits until the workers have processed every one of
them, puts a second batch, waits again, and then shuts the queue down: each worker finishes what it
holds, sees the shutdown and exits.

    python examples/joinable_queue.py [--start-method fork|forkserver|spawn] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
from contextlib import AsyncExitStack
from multiprocessing.context import BaseContext

import aioipc

ROUNDS = 2
TASKS_PER_ROUND = 8


def worker(tasks: aioipc.JoinableQueue[int]) -> None:
    """Runs in each worker process: take a task, do it, mark it done; stop at shutdown."""
    name = multiprocessing.current_process().name
    try:
        while True:
            try:
                task = tasks.sync.get()
            except aioipc.ShutDown:
                break
            try:
                digest = hashlib.sha256(str(task).encode())
                for _ in range(20_000):  # some CPU work
                    digest = hashlib.sha256(digest.digest())
                print(f"{name} did task {task}: {digest.hexdigest()[:12]}", flush=True)
            finally:
                tasks.task_done()
    finally:
        tasks.close()


async def produce(tasks: aioipc.JoinableQueue[int]) -> None:
    """The producer, in the main process's event loop."""
    for round_ in range(1, ROUNDS + 1):
        first = (round_ - 1) * TASKS_PER_ROUND
        for task in range(first, first + TASKS_PER_ROUND):
            await tasks.put(task)
        print(f"round {round_}: put tasks {first}..{first + TASKS_PER_ROUND - 1}", flush=True)
        await tasks.join()  # returns once every task put so far is marked done
        print(f"round {round_}: all tasks done", flush=True)
    tasks.shutdown()


async def run(ctx: BaseContext, workers: int) -> None:
    """The main coroutine: start the workers, produce, and close everything."""
    async with aioipc.JoinableQueue[int](ctx=ctx) as tasks, AsyncExitStack() as processes:
        for i in range(1, workers + 1):
            # Each worker is awaited when the stack closes, before the queue is closed; if the
            # producer fails, the workers are terminated instead.
            await processes.enter_async_context(
                aioipc.open_process(worker, tasks, ctx=ctx, name=f"worker-{i}")
            )
        await produce(tasks)
    print(f"{workers} workers stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods())
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(multiprocessing.get_context(args.start_method), args.workers))


if __name__ == "__main__":
    main()
