"""A queue is freed by reference counting once its user lets go of it, even after its gets raised.

An exception kept in a local (or in a waiter) of the frame that raises it makes a cycle: frame,
exception, traceback, frame. The queue's semaphores then live until the cycle collector runs, and
on Python 3.13 a semaphore the collector finalises while the resource tracker is busy is reported
as leaked. So every raise path of a get must leave no cycle behind. The collector is switched off
while each scenario runs, so a cycle keeps the queue alive and the test fails, deterministically.
"""

from __future__ import annotations

import gc
import multiprocessing
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

import aioipc

FORK = multiprocessing.get_context("fork")


class BreaksOnUnpickling:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_fail_to_rebuild, ())


def _fail_to_rebuild() -> None:
    raise RuntimeError("cannot rebuild this item")


@contextmanager
def cycle_collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def waiting_get_woken_by_shutdown(q: aioipc.Queue[Any]) -> None:
    async def get() -> None:
        try:
            await q.get()
        except aioipc.ShutDown:
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(get)
        with anyio.fail_after(5):
            while q.statistics().waiting_getters == 0:
                await anyio.sleep(0.005)
        q.shutdown()


async def iteration_to_the_end(q: aioipc.Queue[Any]) -> None:
    await q.put(1)
    q.shutdown()
    assert [item async for item in q] == [1]


async def get_of_an_item_that_cannot_be_unpickled(q: aioipc.Queue[Any]) -> None:
    await q.put(BreaksOnUnpickling())
    await q.put(2)
    try:
        await q.get()
    except RuntimeError:
        pass
    assert await q.get() == 2


async def get_batch_of_an_item_that_cannot_be_unpickled(q: aioipc.Queue[Any]) -> None:
    await q.put(BreaksOnUnpickling())
    try:
        await q.get_batch(5)
    except RuntimeError:
        pass


async def get_nowait_of_an_item_that_cannot_be_unpickled(q: aioipc.Queue[Any]) -> None:
    await q.put(BreaksOnUnpickling())
    with anyio.fail_after(5):
        while True:
            try:
                q.get_nowait()
            except aioipc.Empty:
                await anyio.sleep(0.005)
            except RuntimeError:
                return


async def blocking_get_of_an_item_that_cannot_be_unpickled(q: aioipc.Queue[Any]) -> None:
    q.sync.put(BreaksOnUnpickling())
    raised: list[str] = []

    def get() -> None:  # a thread of its own: a pool's idle worker may keep its last exception
        try:
            q.sync.get(timeout=5.0)
        except RuntimeError:
            raised.append("RuntimeError")

    thread = threading.Thread(target=get)
    thread.start()
    await anyio.to_thread.run_sync(thread.join)
    assert raised == ["RuntimeError"]


SCENARIOS: list[Callable[[aioipc.Queue[Any]], Awaitable[None]]] = [
    waiting_get_woken_by_shutdown,
    iteration_to_the_end,
    get_of_an_item_that_cannot_be_unpickled,
    get_batch_of_an_item_that_cannot_be_unpickled,
    get_nowait_of_an_item_that_cannot_be_unpickled,
    blocking_get_of_an_item_that_cannot_be_unpickled,
]


@pytest.mark.anyio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
async def test_a_queue_whose_gets_raised_is_freed_without_the_cycle_collector(
    scenario: Callable[[aioipc.Queue[Any]], Awaitable[None]],
) -> None:
    with cycle_collector_off():
        q: aioipc.Queue[Any] = aioipc.Queue(ctx=FORK)
        await scenario(q)
        q.close()
        queue, sync = weakref.ref(q), weakref.ref(q.sync)
        del q
        assert queue() is None
        assert sync() is None
