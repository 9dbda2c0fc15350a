"""The shared-queue contract: a process takes an item only for a coroutine of its own that waits,
``get_nowait()`` reads the shared queue, a cancelled ``put()`` did not put, every await is a
cancellation point, an immediate shutdown is accounted for in every process, and waiting never
holds the read lock."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
from typing import Any

import anyio
import pytest
import trio
from _helpers import join, start

import aioipc

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


def run_loop(loop: str, main: Any, *args: Any) -> None:
    if loop == "trio":
        trio.run(main, *args)
    else:
        asyncio.run(main(*args))


# -- 1. a process takes only what its coroutines ask for --


def take_all_sync(queue: aioipc.Queue[int], results: aioipc.Queue[Any], n: int) -> None:
    results.sync.put([queue.sync.get(timeout=20) for _ in range(n)])


async def test_a_process_that_got_once_and_idles_takes_nothing_more(ctx: Any) -> None:
    async with (
        aioipc.Queue[int](ctx=ctx) as queue,
        aioipc.Queue[Any](ctx=ctx) as results,
    ):
        for i in range(200):
            await queue.put(i)
        assert await queue.get() == 0
        # Another process finds every other item in the shared queue.
        child = start(ctx, take_all_sync, queue, results, 199)
        with anyio.fail_after(30):
            assert await results.get() == list(range(1, 200))
        assert await join(child) == 0
        assert queue.statistics().buffered == 0


def put_n_then_signal(queue: aioipc.Queue[int], n: int) -> None:
    for i in range(n):
        queue.sync.put(i)


async def test_items_put_while_no_coroutine_waits_stay_in_the_shared_queue() -> None:
    ctx = multiprocessing.get_context("fork")
    async with aioipc.Queue[int](ctx=ctx) as queue:
        await queue.put(-1)
        assert await queue.get() == -1
        child = start(ctx, put_n_then_signal, queue, 100)
        assert await join(child) == 0  # its feeder flushed every item before it exited
        stats = queue.statistics()
        assert (stats.waiting_getters, stats.buffered, stats.qsize) == (0, 0, 100)


def take_one_per_round(
    loop: str, queue: aioipc.Queue[int], barrier: Any, rounds: int, results: aioipc.Queue[Any]
) -> None:
    async def main() -> None:
        got = []
        for _ in range(rounds):
            got.append(await queue.get())
            # Every worker must get an item of this round before any goes on: a worker that took
            # more than it asked for would starve another, and the barrier would break.
            await anyio.to_thread.run_sync(barrier.wait, 20)
        await results.put(got)
        queue.close()
        results.close()

    run_loop(loop, main)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_consumer_processes_share_the_jobs_evenly(ctx: Any) -> None:
    workers, rounds = 4, 3
    barrier = ctx.Barrier(workers)
    async with (
        aioipc.Queue[int](ctx=ctx) as queue,
        aioipc.Queue[Any](ctx=ctx) as results,
    ):
        for i in range(workers * rounds):
            await queue.put(i)
        children = [
            start(ctx, take_one_per_round, loop, queue, barrier, rounds, results)
            for loop in ("asyncio", "trio", "asyncio", "trio")
        ]
        with anyio.fail_after(60):
            shares = [await results.get() for _ in children]
        for child in children:
            assert await join(child) == 0
    assert sorted(len(share) for share in shares) == [rounds] * workers
    assert sorted(item for share in shares for item in share) == list(range(workers * rounds))


def put_one_then_wait(queue: aioipc.Queue[int], go: Any) -> None:
    go.wait(20)
    queue.sync.put(42)


async def test_a_child_forked_after_a_get_receives_the_items() -> None:
    ctx = multiprocessing.get_context("fork")
    async with aioipc.Queue[int](ctx=ctx) as queue, aioipc.Queue[Any](ctx=ctx) as results:
        for i in range(5):
            await queue.put(i)
        assert await queue.get() == 0
        child = start(ctx, take_all_sync, queue, results, 4)
        with anyio.fail_after(30):
            assert await results.get() == [1, 2, 3, 4]
        assert await join(child) == 0


# -- 2. get_nowait() reads the shared queue --


async def test_get_nowait_takes_an_item_put_in_this_process() -> None:
    async with aioipc.Queue[str]() as queue:
        queue.put_nowait("x")
        assert queue.qsize() == 1
        assert queue.get_nowait() == "x"
        with pytest.raises(aioipc.Empty):
            queue.get_nowait()


async def test_get_nowait_takes_an_item_another_process_put() -> None:
    ctx = multiprocessing.get_context("fork")
    async with aioipc.Queue[int](ctx=ctx) as queue:
        child = start(ctx, put_n_then_signal, queue, 3)
        assert await join(child) == 0
        assert [queue.get_nowait() for _ in range(3)] == [0, 1, 2]


async def test_get_nowait_frees_the_slot_a_waiting_put_needs() -> None:
    async with aioipc.Queue[int](1) as queue, anyio.create_task_group() as tg:
        await queue.put(1)
        tg.start_soon(queue.put, 2)
        while queue.statistics().waiting_putters < 1:
            await anyio.sleep(0.001)
        assert queue.get_nowait() == 1
        with anyio.fail_after(5):
            assert await queue.get() == 2


async def test_get_nowait_leaves_a_partly_written_item_for_later() -> None:
    async with aioipc.Queue[bytes]() as queue:
        sync = queue.sync
        payload = b"x" * (4 << 20)  # larger than the pipe: it cannot arrive whole before a read
        writer = threading.Thread(target=sync.put, args=(payload,))
        writer.start()
        try:
            got: bytes | None = None
            with anyio.fail_after(20):
                while got is None:
                    try:
                        got = queue.get_nowait()
                    except aioipc.Empty:
                        await anyio.sleep(0.001)
            assert got == payload
        finally:
            await anyio.to_thread.run_sync(writer.join)


# -- 3. a cancelled put did not put --


@pytest.mark.parametrize("kind", ["own", "wrapped"])
@pytest.mark.blocks_on_the_loop  # it joins its thread
async def test_a_put_cancelled_while_room_appears_either_put_or_raised(kind: str) -> None:
    mp_queue: Any = multiprocessing.get_context("fork").Queue(1) if kind == "wrapped" else None
    queue = aioipc.Queue[int](1) if kind == "own" else aioipc.Queue.wrap(mp_queue)
    try:
        for attempt in range(20):
            await queue.put(-1)
            outcome: list[str] = []

            async def put(
                scope: anyio.CancelScope, i: int = attempt, outcome: list[str] = outcome
            ) -> None:
                with scope:
                    await queue.put(i)
                    outcome.append("put")
                if scope.cancelled_caught:
                    outcome.append("cancelled")

            scope = anyio.CancelScope()
            async with anyio.create_task_group() as tg:
                tg.start_soon(put, scope)
                while queue.statistics().waiting_putters < 1:
                    await anyio.sleep(0.001)
                # Room appears and the cancellation comes in the same step: a race, by design.
                assert await queue.get() == -1
                scope.cancel()
            rest: list[int] = []
            with anyio.fail_after(5):
                while len(rest) < (outcome == ["put"]):
                    rest.append(await queue.get())
            await anyio.sleep(0.02)
            assert queue.qsize() == 0, outcome
            assert rest == ([attempt] if outcome == ["put"] else []), outcome
    finally:
        queue.close()
        if mp_queue is not None:
            mp_queue.close()
            mp_queue.join_thread()


async def test_a_put_closed_while_it_waits_for_room_raises_closed() -> None:
    queue = aioipc.Queue[int](1)
    await queue.put(1)
    outcome: list[object] = []

    async def put() -> None:
        try:
            await queue.put(2)
            outcome.append("put")
        except aioipc.ClosedResourceError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(put)
        while queue.statistics().waiting_putters < 1:
            await anyio.sleep(0.001)
        queue.close()
    assert len(outcome) == 1
    assert isinstance(outcome[0], aioipc.ClosedResourceError)


# -- 4. every await is a cancellation point --


@pytest.mark.parametrize("method", ["get", "get_batch", "put", "join"])
async def test_an_await_in_a_cancelled_scope_raises_even_when_it_need_not_wait(
    method: str,
) -> None:
    async with aioipc.JoinableQueue[int]() as queue:
        for i in range(5):
            await queue.put(i)
        calls = {
            "get": queue.get,
            "get_batch": lambda: queue.get_batch(2),
            "put": lambda: queue.put(9),
            "join": queue.join,
        }
        if method == "join":
            for _ in range(5):
                await queue.get()
                queue.task_done()
        before = queue.qsize()
        with anyio.CancelScope() as scope:
            scope.cancel()
            for _ in range(5):
                try:
                    await calls[method]()
                except anyio.get_cancelled_exc_class():
                    continue
                pytest.fail(f"{method}() in a cancelled scope did not raise")
        assert queue.qsize() == before


@pytest.mark.asyncio
async def test_a_get_after_task_cancel_raises_even_when_an_item_is_there() -> None:
    async with aioipc.Queue[int]() as queue:
        await queue.put(1)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queue.get()
        assert queue.get_nowait() == 1


# -- 5. shutdown, as in Python 3.13's asyncio.Queue --


def take_three_finish_two(queue: aioipc.JoinableQueue[int], ready: Any, finish: Any) -> None:
    for _ in range(3):
        queue.sync.get(timeout=20)
    queue.task_done()
    queue.task_done()
    ready.set()
    finish.wait(20)
    queue.task_done()


async def test_immediate_shutdown_counts_discarded_items_done_and_join_waits_for_the_rest(
    ctx: Any,
) -> None:
    ready, finish = ctx.Event(), ctx.Event()
    async with aioipc.JoinableQueue[int](ctx=ctx) as queue:
        for i in range(10):
            await queue.put(i)
        child = start(ctx, take_three_finish_two, queue, ready, finish)
        await anyio.to_thread.run_sync(ready.wait, 20)
        queue.shutdown(immediate=True)  # 7 discarded and done; 1 handed out, not done
        assert queue.qsize() == 0
        with anyio.move_on_after(0.2) as scope:
            await queue.join()
        assert scope.cancelled_caught  # join() waits for the item the child still holds
        finish.set()
        with anyio.fail_after(10):
            await queue.join()
        assert await join(child) == 0
        with pytest.raises(ValueError, match="more times"):
            queue.task_done()


def shut_down_immediately(queue: aioipc.Queue[int]) -> None:
    queue.shutdown(immediate=True)
    queue.close()


async def test_immediate_shutdown_elsewhere_drops_what_this_process_holds() -> None:
    ctx = multiprocessing.get_context("fork")
    async with aioipc.JoinableQueue[int](ctx=ctx, prefetch=8) as queue:
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.get)  # with a waiter, the reader may take up to 8 more
            while queue.statistics().waiting_getters < 1:
                await anyio.sleep(0.001)
            for i in range(10):
                queue.sync.put(i)
        queue.task_done()
        child = start(ctx, shut_down_immediately, queue)
        assert await join(child) == 0
        with pytest.raises(aioipc.ShutDown):
            await queue.get()
        assert queue.statistics().buffered == 0
        with anyio.fail_after(5):
            await queue.join()  # every item was taken and done, or discarded


async def test_graceful_shutdown_lets_join_wait_for_items_handed_out() -> None:
    async with aioipc.JoinableQueue[int]() as queue:
        await queue.put(1)
        assert await queue.get() == 1
        queue.shutdown()
        with anyio.move_on_after(0.1) as scope:
            await queue.join()
        assert scope.cancelled_caught
        queue.task_done()
        with anyio.fail_after(5):
            await queue.join()


# -- 6. waiting never holds the read lock --


def wait_in_get(face: str, queue: aioipc.Queue[int], waiting: Any) -> None:
    waiting.set()
    if face == "sync":
        queue.sync.get()
    else:

        async def main() -> None:
            await queue.get()

        asyncio.run(main())


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_a_consumer_killed_while_waiting_blocks_no_other(ctx: Any, face: str) -> None:
    waiting = ctx.Event()
    async with aioipc.Queue[int](ctx=ctx) as queue:
        victim = start(ctx, wait_in_get, face, queue, waiting)
        await anyio.to_thread.run_sync(waiting.wait, 20)
        await anyio.sleep(0.2)  # let it settle in its get (a kill earlier proves less, not more)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        assert await join(victim) == -signal.SIGKILL
        await queue.put(7)
        with anyio.fail_after(10):
            assert await anyio.to_thread.run_sync(queue.sync.get, True, 10) == 7


def wait_in_join(face: str, queue: aioipc.JoinableQueue[int], waiting: Any) -> None:
    waiting.set()
    if face == "sync":
        queue.sync.join()
    else:

        async def main() -> None:
            await queue.join()

        asyncio.run(main())


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_a_process_killed_while_waiting_in_join_wedges_nothing(face: str) -> None:
    ctx = multiprocessing.get_context("fork")
    waiting = ctx.Event()
    async with aioipc.JoinableQueue[int](ctx=ctx) as queue:
        for i in range(3):
            await queue.put(i)
        victim = start(ctx, wait_in_join, face, queue, waiting)
        await anyio.to_thread.run_sync(waiting.wait, 20)
        await anyio.sleep(0.2)  # let it settle in its join
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        assert await join(victim) == -signal.SIGKILL
        with anyio.fail_after(10):
            assert [await queue.get() for _ in range(3)] == [0, 1, 2]
            for _ in range(3):
                queue.task_done()
            await queue.join()
            await queue.put(3)
            assert await anyio.to_thread.run_sync(queue.sync.get, True, 5) == 3
            queue.task_done()
            await queue.join()
            queue.shutdown()
            with pytest.raises(aioipc.ShutDown):
                await queue.get()


# -- several event loops in one process --


async def test_consumers_on_two_event_loops_of_one_process_share_the_queue() -> None:
    n = 2000
    ctx = multiprocessing.get_context("fork")
    got: dict[str, list[int]] = {"asyncio": [], "trio": []}
    async with aioipc.Queue[int](ctx=ctx) as queue:

        async def consume(name: str) -> None:
            try:
                while True:
                    got[name].append(await queue.get())
            except aioipc.ShutDown:
                pass

        threads = [
            threading.Thread(target=asyncio.run, args=(consume("asyncio"),)),
            threading.Thread(target=trio.run, args=(consume, "trio")),
        ]
        for thread in threads:
            thread.start()
        child = start(ctx, put_n_then_signal, queue, n)
        assert await join(child) == 0
        queue.shutdown()
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join, 30)
            assert not thread.is_alive()
    assert sorted(got["asyncio"] + got["trio"]) == list(range(n))


# -- any unpickling failure is the failure of its own get --


class ExitsOnUnpickling:
    """Pickles fine; rebuilding it raises SystemExit (not an Exception)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_exit_on_rebuild, ())


def _exit_on_rebuild() -> None:
    raise SystemExit("raised while unpickling")


async def test_an_item_whose_unpickling_raises_system_exit_fails_only_its_get() -> None:
    async with aioipc.Queue[Any]() as queue:
        await queue.put(1)
        await queue.put(ExitsOnUnpickling())
        await queue.put(2)
        assert await queue.get() == 1
        with pytest.raises(SystemExit, match="while unpickling"):
            await queue.get()
        assert await queue.get() == 2


def test_the_blocking_face_reports_a_system_exit_from_unpickling_at_its_get() -> None:
    queue = aioipc.Queue[Any]()
    try:
        queue.sync.put(ExitsOnUnpickling())
        queue.sync.put(3)
        with pytest.raises(SystemExit, match="while unpickling"):
            queue.sync.get(timeout=5)
        assert queue.sync.get(timeout=5) == 3
    finally:
        queue.close()


# -- arguments --


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prefetch": 1.5}, TypeError),
        ({"prefetch": "x"}, TypeError),
        ({"prefetch": -1}, ValueError),
        ({"maxsize": 2**31}, ValueError),
        ({"maxsize": "3"}, TypeError),
        ({"ctx": "spawn"}, TypeError),
    ],
)
def test_a_bad_argument_is_refused_at_the_constructor(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        aioipc.Queue(**kwargs)
