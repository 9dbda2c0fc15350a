"""The cancellation contract: a cancelled or timed-out wait loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from typing import Any

import anyio
import pytest
import trio

import aioipc

N = 3000


async def consume_with_random_timeouts(
    queue: aioipc.Queue[int], seed: int, batch: bool = False
) -> tuple[list[int], int]:
    """Get until shutdown. The first wait and a third of the others start in an already cancelled
    scope: each of them must raise the cancellation (every get is a cancellation point), so the
    count of cancelled waits is known in advance (at least 1, however the items are shared
    between consumers). The others give up after a random 0-2 ms. Returns the items and the
    number of waits cancelled on purpose."""
    rng = random.Random(seed)
    got: list[int] = []
    cancelled = 0
    while True:
        precancelled = rng.random() < 0.3 or cancelled == 0
        with anyio.move_on_after(rng.uniform(0, 0.002)) as scope:
            if precancelled:
                scope.cancel()
            try:
                if batch:
                    got += await queue.get_batch(rng.randint(1, 8))
                else:
                    got.append(await queue.get())
            except aioipc.ShutDown:
                return got, cancelled
        if precancelled:
            assert scope.cancelled_caught, "a get in a cancelled scope returned"
            cancelled += 1


async def produce_in_bursts(queue: aioipc.Queue[int], n: int, seed: int) -> None:
    rng = random.Random(seed)
    i = 0
    while i < n:
        for _ in range(rng.randint(1, 8)):
            if i < n:
                await queue.put(i)
                i += 1
        await anyio.sleep(rng.uniform(0, 0.003))
    queue.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("batch", [False, True], ids=["get", "get_batch"])
async def test_random_timeouts_of_one_consumer_lose_nothing_and_keep_fifo_order(
    batch: bool,
) -> None:
    async with aioipc.Queue[int]() as queue, anyio.create_task_group() as tg:
        tg.start_soon(produce_in_bursts, queue, N, 1)
        got, timeouts = await consume_with_random_timeouts(queue, 2, batch)
    assert got == list(range(N))
    assert timeouts > 0


# -- asyncio's own ways of cancelling --


async def _asyncio_consume(queue: aioipc.Queue[int], how: str, seed: int) -> tuple[list[int], int]:
    rng = random.Random(seed)
    got: list[int] = []
    cancels = 0
    while True:
        delay = rng.uniform(0, 0.002)
        try:
            if how == "wait_for":
                got.append(await asyncio.wait_for(queue.get(), delay))
            elif how == "timeout" and hasattr(asyncio, "timeout"):
                async with asyncio.timeout(delay):
                    got.append(await queue.get())
            else:
                task = asyncio.ensure_future(queue.get())
                await asyncio.wait([task], timeout=delay)
                task.cancel()
                try:
                    got.append(await task)
                except asyncio.CancelledError:
                    cancels += 1
        except (asyncio.TimeoutError, TimeoutError):
            cancels += 1
        except aioipc.ShutDown:
            return got, cancels


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["wait_for", "timeout", "task_cancel"])
async def test_asyncio_timeouts_and_task_cancel_lose_nothing(how: str) -> None:
    async with aioipc.Queue[int]() as queue:
        producer = asyncio.ensure_future(produce_in_bursts(queue, N, 3))
        got, _ = await _asyncio_consume(queue, how, 4)
        await producer
    assert got == list(range(N))


# -- two consumer processes, each cancelling at random --


def consumer_process(
    loop: str, queue: aioipc.Queue[int], results: aioipc.Queue[Any], seed: int
) -> None:
    async def main() -> None:
        got, timeouts = await consume_with_random_timeouts(queue, seed)
        await results.put((got, timeouts))
        queue.close()
        results.close()

    if loop == "trio":
        trio.run(main)
    else:
        asyncio.run(main())


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefetch", [0, 64])
async def test_random_timeouts_across_two_consumer_processes_lose_and_duplicate_nothing(
    prefetch: int,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    async with (
        aioipc.Queue[int](ctx=ctx, prefetch=prefetch) as queue,
        aioipc.Queue[Any](ctx=ctx) as results,
    ):
        children = [
            ctx.Process(target=consumer_process, args=(loop, queue, results, seed))
            for seed, loop in enumerate(["asyncio", "trio"])
        ]
        for child in children:
            child.start()
        await produce_in_bursts(queue, N, 5)
        with anyio.fail_after(60):
            reports = [await results.get(), await results.get()]
        for child in children:
            await anyio.to_thread.run_sync(child.join, 30)
            assert child.exitcode == 0
    items = [item for got, _ in reports for item in got]
    assert sorted(items) == list(range(N))  # nothing lost, nothing duplicated
    for got, _ in reports:
        assert got == sorted(got)  # each consumer sees its share in FIFO order
    assert all(timeouts > 0 for _, timeouts in reports)


# -- puts --


@pytest.mark.anyio
async def test_cancelled_puts_on_a_full_queue_never_put_an_item_twice() -> None:
    async with aioipc.Queue[int](2) as queue:
        sent: list[int] = []
        received: list[int] = []

        async def producer() -> None:
            rng = random.Random(6)
            for i in range(500):
                precancelled = rng.random() < 0.2
                with anyio.move_on_after(rng.uniform(0, 0.002)) as scope:
                    if precancelled:
                        scope.cancel()
                    await queue.put(i)
                    sent.append(i)
                assert scope.cancelled_caught or not precancelled
            queue.shutdown()

        async def consumer() -> None:
            rng = random.Random(7)
            async for item in queue:
                received.append(item)
                await anyio.sleep(rng.uniform(0, 0.001))

        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            tg.start_soon(consumer)
    # A put that returned was received, once; a put that was cancelled was not.
    assert received == sent
    assert len(sent) < 500  # some puts were cancelled while waiting for room
