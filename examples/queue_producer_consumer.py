"""Producer and consumer: a worker process puts items into an aioipc queue, a coroutine gets them.

This is the classic multiprocessing producer/consumer program, with an async consumer. The classic
version stops consuming when it sees the queue empty, which races with a slow producer; here the
producer shuts the queue down when it is done, and the consumer's ``async for`` ends once it has
taken every item.

    python examples/queue_producer_consumer.py [--start-method fork|forkserver|spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time
from multiprocessing.context import BaseContext

import aioipc

ITEMS = 10


def producer(queue: aioipc.Queue[int]) -> None:
    """Runs in the worker process: synchronous code, so it uses the queue's blocking face."""
    name = multiprocessing.current_process().name
    try:
        for _ in range(ITEMS):
            item = random.randint(0, 256)
            queue.sync.put(item)
            print(f"Process Producer : item {item} appended to queue {name}", flush=True)
            time.sleep(0.05)
            print(f"The size of queue is {queue.qsize()}", flush=True)
    finally:
        # Seen by every process: the consumer takes what is still queued, then its loop ends.
        queue.shutdown()
        queue.close()


async def consumer(queue: aioipc.Queue[int], name: str) -> int:
    """Awaits the items until the queue is shut down and drained; returns how many it popped."""
    popped = 0
    async for item in queue:
        print(f"Process Consumer : item {item} popped from by {name}", flush=True)
        popped += 1
        await asyncio.sleep(0.1)  # slower than the producer, so the queue fills up
    return popped


async def run(ctx: BaseContext) -> None:
    """The main coroutine: start the producer, consume, and close everything."""
    # The queue uses the same context as the process. prefetch=0: this process takes items only
    # when the consumer asks for one, so the others stay in the shared queue, where the producer's
    # qsize() counts them. The open_process() block awaits the producer's exit at its end (and
    # raises if it failed); then the queue is closed.
    async with (
        aioipc.Queue[int](ctx=ctx, prefetch=0) as queue,
        aioipc.open_process(producer, queue, ctx=ctx, name="Producer") as process,
    ):
        # Should the producer die before its shutdown(), the consumer gets BrokenResourceError
        # once it has taken what is queued, instead of waiting forever.
        queue.link(process)
        popped = await consumer(queue, "Consumer")
    print(f"The consumer popped {popped} items; the producer exited with code {process.exitcode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods())
    args = parser.parse_args()
    asyncio.run(run(multiprocessing.get_context(args.start_method)))


if __name__ == "__main__":
    main()
