"""aioipc queues shared by real processes, under every start method."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import anyio
import pytest
import trio
from _helpers import join, start

import aioipc

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

N = 500


# -- child process bodies (module level, so that spawn can import them) --


def put_range_sync(queue: aioipc.Queue[int], n: int) -> None:
    for i in range(n):
        queue.sync.put(i)


def put_range_then_shutdown(queue: aioipc.Queue[int], n: int) -> None:
    put_range_sync(queue, n)
    queue.shutdown()


def run_child_loop(loop: str, main: Any, *args: Any) -> None:
    if loop == "trio":
        trio.run(main, *args)
    else:
        asyncio.run(main(*args))


async def sum_until_shutdown(queue: aioipc.Queue[int], results: aioipc.Queue[int]) -> None:
    total = 0
    async for item in queue:
        total += item
    await results.put(total)
    queue.close()
    results.close()


def consume_async_in_child(loop: str, queue: aioipc.Queue[int], results: aioipc.Queue[int]) -> None:
    run_child_loop(loop, sum_until_shutdown, queue, results)


async def put_range_async(queue: aioipc.Queue[int], n: int) -> None:
    for i in range(n):
        await queue.put(i)
    queue.close()


def produce_async_in_child(loop: str, queue: aioipc.Queue[int], n: int) -> None:
    run_child_loop(loop, put_range_async, queue, n)


async def report_shutdown(queue: aioipc.Queue[int], results: aioipc.Queue[str]) -> None:
    await results.put("waiting")
    try:
        await queue.get()
    except aioipc.ShutDown:
        await results.put("shut down")
    queue.close()
    results.close()


def wait_for_shutdown_in_child(
    loop: str, queue: aioipc.Queue[int], results: aioipc.Queue[str]
) -> None:
    run_child_loop(loop, report_shutdown, queue, results)


def get_sync_until_shutdown(queue: aioipc.Queue[int], results: aioipc.Queue[Any]) -> None:
    got = []
    try:
        while True:
            got.append(queue.sync.get(timeout=10))
    except aioipc.ShutDown:
        results.sync.put(got)


def do_tasks(queue: aioipc.JoinableQueue[int], done: aioipc.Queue[int]) -> None:
    while True:
        try:
            item = queue.sync.get(timeout=10)
        except aioipc.ShutDown:
            return
        done.sync.put(item)
        queue.task_done()


async def collect_n(queue: aioipc.Queue[int], results: aioipc.Queue[Any], n: int) -> None:
    await results.put([await queue.get() for _ in range(n)])
    queue.close()
    results.close()


def collect_n_in_child(
    loop: str, queue: aioipc.Queue[int], results: aioipc.Queue[Any], n: int
) -> None:
    run_child_loop(loop, collect_n, queue, results, n)


# -- tests --


async def test_items_put_synchronously_by_a_child_reach_an_async_consumer(ctx: Any) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue:
        child = start(ctx, put_range_sync, queue, N)
        assert [await queue.get() for _ in range(N)] == list(range(N))
        assert await join(child) == 0


@pytest.mark.parametrize("child_loop", ["asyncio", "trio"])
async def test_a_child_consumes_with_its_own_event_loop(ctx: Any, child_loop: str) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue, aioipc.Queue[int](ctx=ctx) as results:
        child = start(ctx, consume_async_in_child, child_loop, queue, results)
        for i in range(N):
            await queue.put(i)
        queue.shutdown()
        with anyio.fail_after(30):
            assert await results.get() == sum(range(N))
        assert await join(child) == 0


@pytest.mark.parametrize("child_loop", ["asyncio", "trio"])
async def test_a_child_produces_with_its_own_event_loop(ctx: Any, child_loop: str) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue:
        child = start(ctx, produce_async_in_child, child_loop, queue, N)
        with anyio.fail_after(30):
            assert [await queue.get() for _ in range(N)] == list(range(N))
        assert await join(child) == 0


async def test_shutdown_in_the_parent_wakes_a_getter_waiting_in_a_child(ctx: Any) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue, aioipc.Queue[str](ctx=ctx) as results:
        child = start(ctx, wait_for_shutdown_in_child, "asyncio", queue, results)
        with anyio.fail_after(30):
            assert await results.get() == "waiting"
        await anyio.sleep(0.1)  # the child is parked in get()
        queue.shutdown()
        with anyio.fail_after(30):
            assert await results.get() == "shut down"
        assert await join(child) == 0


async def test_shutdown_in_a_child_ends_iteration_in_the_parent(ctx: Any) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue:
        child = start(ctx, put_range_then_shutdown, queue, N)
        with anyio.fail_after(30):
            assert [item async for item in queue] == list(range(N))
        assert await join(child) == 0


async def test_a_sync_getter_in_a_child_sees_the_items_then_shutdown(ctx: Any) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue, aioipc.Queue[Any](ctx=ctx) as results:
        child = start(ctx, get_sync_until_shutdown, queue, results)
        for i in range(N):
            await queue.put(i)
        queue.shutdown()
        with anyio.fail_after(30):
            assert await results.get() == list(range(N))
        assert await join(child) == 0


async def test_two_consumer_processes_share_the_items_without_loss_or_duplicates(
    ctx: Any,
) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue, aioipc.Queue[Any](ctx=ctx) as results:
        children = [start(ctx, get_sync_until_shutdown, queue, results) for _ in range(2)]
        for i in range(N):
            await queue.put(i)
        queue.shutdown()
        with anyio.fail_after(30):
            parts = [await results.get(), await results.get()]
        assert sorted(parts[0] + parts[1]) == list(range(N))
        for part in parts:
            assert part == sorted(part)
        for child in children:
            assert await join(child) == 0


async def test_join_waits_for_task_done_in_worker_processes(ctx: Any) -> None:
    async with aioipc.JoinableQueue[int](ctx=ctx) as queue, aioipc.Queue[int](ctx=ctx) as done:
        workers = [start(ctx, do_tasks, queue, done) for _ in range(2)]
        for i in range(50):
            await queue.put(i)
        with anyio.fail_after(30):
            await queue.join()
        assert queue.qsize() == 0
        assert sorted([await done.get() for _ in range(50)]) == list(range(50))
        queue.shutdown()
        for worker in workers:
            assert await join(worker) == 0


async def test_qsize_counts_items_put_by_another_process(ctx: Any) -> None:
    async with aioipc.Queue[int](ctx=ctx) as queue:
        child = start(ctx, put_range_sync, queue, 10)
        assert await join(child) == 0
        assert queue.qsize() == 10
        assert [await queue.get() for _ in range(10)] == list(range(10))
        assert queue.qsize() == 0


async def test_a_queue_used_in_the_parent_works_in_a_forked_child() -> None:
    ctx = multiprocessing.get_context("fork")
    async with aioipc.Queue[int](ctx=ctx) as queue, aioipc.Queue[Any](ctx=ctx) as results:
        for i in range(10):
            await queue.put(i)
        assert await queue.get() == 0  # the parent takes one item, and no more
        child = start(ctx, collect_n_in_child, "trio", queue, results, 19)
        for i in range(10, 20):
            await queue.put(i)
        with anyio.fail_after(30):
            assert sorted(await results.get()) == list(range(1, 20))
        assert queue.statistics().buffered == 0
        assert await join(child) == 0
