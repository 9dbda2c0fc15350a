"""Supervision: a queue linked to its producers turns their death into an error, not a hang.

Every fault test checks, besides the outcome, that nothing leaks: no process or aioipc thread (the
shared ``no_leaks`` fixture) and no file descriptor (counted in /proc/self/fd).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

import anyio
import pytest
from _helpers import fds_back_to, open_fds, wait_until_set

import aioipc
from aioipc._mpqueue import _BROKEN, _WHOLDER, _WMID

pytestmark = pytest.mark.anyio

FORK = multiprocessing.get_context("fork")


# -- targets (module level, so that spawn and forkserver children can import them) --


def put_range(q: aioipc.Queue[int], n: int, shutdown: bool = False) -> None:
    for i in range(n):
        q.sync.put(i)
    if shutdown:
        q.sync.shutdown()  # type: ignore[attr-defined]


def put_range_slowly(q: aioipc.Queue[int], start: int, n: int) -> None:
    for i in range(start, start + n):
        q.sync.put(i)
        time.sleep(0.005)


def put_range_then_raise(q: aioipc.Queue[int], n: int) -> None:
    put_range(q, n)
    raise ValueError("the producer broke")


def put_forever(q: aioipc.Queue[int]) -> None:
    i = 0
    while True:
        q.sync.put(i)
        i += 1
        if i % 1000 == 0:
            time.sleep(0.001)  # let the consumer keep up


def put_range_and_hang(q: aioipc.Queue[int], n: int) -> None:
    put_range(q, n)
    time.sleep(60)


def put_range_flush_and_hang(q: aioipc.Queue[int], n: int, flushed: Any) -> None:
    put_range(q, n)
    q.sync.close()  # returns once every item is in the pipe
    flushed.set()
    time.sleep(60)


def put_large_item_and_hang(q: aioipc.Queue[Any], size: int, put: Any) -> None:
    q.sync.put("small")
    q.sync.put(b"x" * size)  # the feeder thread fills the pipe, then waits for a reader
    put.set()
    time.sleep(60)


def hold_the_write_lock(q: aioipc.Queue[int], holding: Any) -> None:
    q.sync._w.try_acquire()  # type: ignore[attr-defined]  # as a producer killed inside put()
    holding.set()
    time.sleep(60)


def consume_sync(q: aioipc.Queue[int], report: aioipc.Queue[Any]) -> None:
    count = 0
    try:
        while True:
            q.sync.get()
            count += 1
    except Exception as exc:
        report.sync.put(("sync", count, type(exc).__name__, str(exc)))


def consume_async(q: aioipc.Queue[int], report: aioipc.Queue[Any]) -> None:
    async def main() -> None:
        count = 0
        try:
            async for _ in q:
                count += 1
        except Exception as exc:
            await report.put(("async", count, type(exc).__name__, str(exc)))
        else:
            await report.put(("async", count, "ended", ""))

    anyio.run(main)


def consume_and_echo(q: aioipc.Queue[int], echo: aioipc.Queue[tuple[int, int]]) -> None:
    async def main() -> None:
        async for item in q:
            await echo.put((os.getpid(), item))

    anyio.run(main)


# -- helpers --


async def drain(q: aioipc.Queue[Any], into: list[Any]) -> None:
    """Get items into ``into`` until the queue ends (ShutDown ends the loop; errors propagate)."""
    with anyio.fail_after(20):
        async for item in q:
            into.append(item)


def exit_at_once() -> None:
    pass


def baseline_fds(ctx: Any) -> int:
    """The number of open fds, once the event loop and ``ctx``'s helpers (fork server, resource
    tracker, the shared memory arena of queues) exist."""
    aioipc.Queue(ctx=ctx).close()
    process = ctx.Process(target=exit_at_once)
    process.start()
    process.join()
    process.close()
    return open_fds()


# -- the normal ends --


async def test_iteration_ends_cleanly_once_every_linked_producer_exited_with_0(ctx: Any) -> None:
    fds = baseline_fds(ctx)
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    received: list[int] = []
    async with aioipc.open_process(put_range, q, 1000, ctx=ctx, name="producer") as producer:
        q.link(producer)
        await drain(q, received)  # async for ends, as after shutdown()
    assert received == list(range(1000))
    with pytest.raises(aioipc.ShutDown):
        await q.get()
    q.close()
    assert await fds_back_to(fds) == fds


async def test_producers_that_all_finish_before_the_consumer_end_the_stream_cleanly() -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=FORK)
    received: list[int] = []
    async with (
        aioipc.open_process(put_range, q, 100, ctx=FORK) as first,
        aioipc.open_process(put_range_slowly, q, 100, 10, ctx=FORK) as second,
        aioipc.open_process(put_range, q, 0, ctx=FORK) as third,
    ):
        q.link(first, second, third)
        for process in (first, second, third):
            assert await process.wait() == 0  # all gone before the first get
        await drain(q, received)
    assert sorted(received) == [*range(100), *range(100, 110)]
    q.close()


async def test_mixed_exits_name_every_failed_producer_and_only_them() -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=FORK)
    received: list[int] = []

    async def consume() -> None:
        async with (
            aioipc.open_process(put_range, q, 10, ctx=FORK, name="fine") as fine,
            aioipc.open_process(put_range_then_raise, q, 10, ctx=FORK, name="raises") as raises,
            # Killed once idle: the point here is naming it, not where the kill lands.
            aioipc.open_process(put_range_and_hang, q, 10, ctx=FORK, name="killed") as killed,
        ):
            q.link(fine, raises, killed)
            await raises.wait()
            killed.kill()
            await drain(q, received)

    with pytest.raises(aioipc.BrokenResourceError) as info:
        await consume()
    message = str(info.value)
    assert message.startswith("2 of the 3 producers linked to the queue failed: ")
    assert "raises (pid" in message
    assert "exited with code 1" in message
    assert "killed (pid" in message
    assert "was killed by SIGKILL" in message
    assert "fine (pid" not in message
    assert all(received.count(i) >= 2 for i in range(10))  # the items came first
    q.close()


async def test_no_internal_exception_is_chained_into_the_error() -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=FORK)

    async def consume() -> None:
        async with aioipc.open_process(put_range_then_raise, q, 0, ctx=FORK) as producer:
            q.link(producer)
            await drain(q, [])

    with pytest.raises(aioipc.BrokenResourceError) as info:
        await consume()
    q.close()
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None


async def test_iteration_ends_cleanly_when_the_producer_shut_the_queue_down(ctx: Any) -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    received: list[int] = []
    async with aioipc.open_process(put_range, q, 1000, True, ctx=ctx) as producer:
        q.link(producer)
        await drain(q, received)
    assert received == list(range(1000))
    q.close()


async def test_the_error_waits_for_every_linked_producer() -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=FORK)
    received: list[int] = []

    async def consume() -> None:
        async with (
            aioipc.open_process(put_range, q, 10, ctx=FORK, name="quick") as quick,
            aioipc.open_process(put_range_slowly, q, 100, 100, ctx=FORK, name="slow") as slow,
        ):
            q.link(quick, slow)
            await quick.wait()
            with anyio.fail_after(5):
                while len(received) < 20:  # the slow one still puts: no error yet
                    received.append(await q.get())
            slow.kill()
            await drain(q, received)

    with pytest.raises(aioipc.BrokenResourceError) as info:
        await consume()
    from_slow = [item for item in received if item >= 100]
    assert sorted(set(received) - set(from_slow)) == list(range(10))
    assert from_slow == list(range(100, 100 + len(from_slow)))
    assert "1 of the 2 producers" in str(info.value)
    assert "quick (pid" not in str(info.value)  # it exited with 0
    assert "slow (pid" in str(info.value)
    assert "was killed by SIGKILL" in str(info.value)
    q.close()


async def test_getters_in_other_processes_see_the_end_too(ctx: Any) -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    report: aioipc.Queue[Any] = aioipc.Queue(ctx=ctx)
    async with (
        aioipc.open_process(consume_sync, q, report, ctx=ctx),
        aioipc.open_process(consume_async, q, report, ctx=ctx),
        aioipc.open_process(put_range, q, 2000, ctx=ctx) as producer,
    ):
        q.link(producer)
        with anyio.fail_after(20):
            outcomes = sorted([await report.get(), await report.get()])
    assert [kind for kind, *_ in outcomes] == ["async", "sync"]
    assert sum(count for _, count, *_ in outcomes) == 2000
    assert [error for _, _, error, _ in outcomes] == ["ended", "ShutDown"]
    q.close()
    report.close()


def test_link_needs_started_processes_and_a_queue_made_by_aioipc() -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=FORK)
    with pytest.raises(ValueError, match="has not been started"):
        q.link(aioipc.Process(target=time.sleep, args=(0,), ctx=FORK))
    q.close()
    wrapped = aioipc.Queue.wrap(FORK.Queue())
    process = aioipc.Process(target=time.sleep, args=(0,), ctx=FORK)
    process.start()
    with pytest.raises(TypeError, match="wrap"):
        wrapped.link(process)
    process.join()
    process.close()
    wrapped.close()


# -- faults --


async def test_a_producer_killed_mid_stream_yields_a_gapless_prefix_then_the_error(
    ctx: Any,
) -> None:
    fds = baseline_fds(ctx)
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    received: list[int] = []

    async def consume() -> None:
        async with aioipc.open_process(put_forever, q, ctx=ctx) as producer:
            q.link(producer)
            with anyio.fail_after(20):
                while len(received) < 3000:
                    received.append(await q.get())
            producer.kill()
            await drain(q, received)

    with pytest.raises(aioipc.BrokenResourceError, match=r"killed by SIGKILL \(exit code -9\)"):
        await consume()
    assert received == list(range(len(received)))
    q.close()
    assert await fds_back_to(fds) == fds


async def test_every_item_in_the_pipe_before_a_sigkill_is_delivered(ctx: Any) -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    flushed = ctx.Event()
    received: list[int] = []

    async def consume() -> None:
        # 2000 small items fit in the pipe: all are written before the kill, none is read yet.
        async with aioipc.open_process(put_range_flush_and_hang, q, 2000, flushed, ctx=ctx) as p:
            q.link(p)
            await wait_until_set(flushed)
            p.kill()
            await drain(q, received)

    with pytest.raises(aioipc.BrokenResourceError, match="killed by SIGKILL"):
        await consume()
    assert received == list(range(2000))
    q.close()


async def test_a_producer_that_raises_is_reported_after_its_items(ctx: Any) -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    received: list[int] = []

    async def consume() -> None:
        async with aioipc.open_process(put_range_then_raise, q, 100, ctx=ctx) as producer:
            q.link(producer)
            await drain(q, received)

    with pytest.raises(aioipc.BrokenResourceError, match=r"exited with code 1$"):
        await consume()
    assert received == list(range(100))
    q.close()


async def test_a_producer_killed_holding_the_write_lock_does_not_stop_the_others(
    ctx: Any,
) -> None:
    # Killed inside put() between two items: the lock is given back and the stream goes on.
    fds = baseline_fds(ctx)
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    holding = ctx.Event()
    received: list[int] = []

    async def consume() -> None:
        async with aioipc.open_process(hold_the_write_lock, q, holding, ctx=ctx) as holder:
            q.link(holder)
            await wait_until_set(holding)
            async with aioipc.open_process(put_range_slowly, q, 0, 20, ctx=ctx) as producer:
                q.link(producer)
                holder.kill()
                await drain(q, received)

    with pytest.raises(aioipc.BrokenResourceError, match="1 of the 2 producers") as info:
        await consume()
    assert received == list(range(20))
    assert "was killed by SIGKILL" in str(info.value)  # the holder
    q.close()
    assert await fds_back_to(fds) == fds


@pytest.mark.parametrize("ctx", [FORK, multiprocessing.get_context("spawn")], ids=["fork", "spawn"])
async def test_a_producer_terminated_in_the_middle_of_a_large_item_raises(
    ctx: Any,
) -> None:
    fds = baseline_fds(ctx)
    q: aioipc.Queue[Any] = aioipc.Queue(ctx=ctx, prefetch=0)
    put = ctx.Event()

    async def consume() -> None:
        async with aioipc.open_process(put_large_item_and_hang, q, 10_000_000, put, ctx=ctx) as p:
            q.link(p)
            assert await q.get() == "small"
            await wait_until_set(put)
            await anyio.sleep(0.1)  # the pipe is full: the large item is half written
            p.terminate()
            with anyio.fail_after(10):
                await q.get()

    with pytest.raises(aioipc.BrokenResourceError, match="cut the queue's stream") as info:
        await consume()
    assert "was killed by SIGTERM" in str(info.value)
    q.close()  # the reader thread, blocked on the rest of the item, sees the end of the pipe
    assert await fds_back_to(fds) == fds


async def test_a_killed_consumer_does_not_stop_the_others(ctx: Any) -> None:
    # A consumer waiting in get() holds no lock: killing it costs only the items it had taken.
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    echo: aioipc.Queue[tuple[int, int]] = aioipc.Queue(ctx=ctx)
    victim = aioipc.Process(target=consume_and_echo, args=(q, echo), ctx=ctx)
    victim.start()
    async with aioipc.open_process(consume_and_echo, q, echo, ctx=ctx) as survivor:
        for i in range(100):
            await q.put(i)
        with anyio.fail_after(20):
            first = [await echo.get() for _ in range(100)]
        assert sorted(item for _, item in first) == list(range(100))
        victim.kill()
        assert await victim.wait() == -signal.SIGKILL
        for i in range(100, 200):
            await q.put(i)
        q.shutdown()
        with anyio.fail_after(20):
            second = [await echo.get() for _ in range(100)]
        assert second == [(survivor.pid, i) for i in range(100, 200)]
    victim.close()
    q.close()
    echo.close()


def take_n_blocking(q: aioipc.Queue[int], n: int, report: aioipc.Queue[Any]) -> None:
    report.sync.put([q.sync.get(timeout=30) for _ in range(n)])


async def test_a_writer_killed_holding_the_write_lock_is_replaced_while_a_blocking_consumer_waits(
    ctx: Any,
) -> None:
    # No link: the queue records who holds its locks, and the next writer finds the holder dead.
    # A consumer waiting in the blocking get() holds no lock meanwhile, so nothing looks "cut".
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    report: aioipc.Queue[Any] = aioipc.Queue(ctx=ctx)
    holding = ctx.Event()
    holder = aioipc.Process(target=hold_the_write_lock, args=(q, holding), ctx=ctx)
    holder.start()
    await wait_until_set(holding)
    async with aioipc.open_process(take_n_blocking, q, 20, report, ctx=ctx):
        holder.kill()
        assert await holder.wait() == -signal.SIGKILL
        for i in range(20):
            await q.put(i)
        with anyio.fail_after(30):
            assert await report.get() == list(range(20))
    holder.close()
    q.close()
    report.close()


# -- a cut stream ends every waiter, in every process --


def _stat_state(pid: int) -> bytes:
    """The process state letter in /proc (R, S, T for stopped, Z...)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0]


async def stop_in_the_middle_of_an_item(q: aioipc.Queue[Any], pid: int) -> None:
    """SIGSTOP process ``pid`` once it is in the middle of writing an item (holding the queue's
    write lock); retry with its next item if it finished this one before the signal landed."""
    state = q.sync._state  # type: ignore[attr-defined]
    with anyio.fail_after(20):
        while True:
            while not (state[_WHOLDER] == pid and state[_WMID]):
                await anyio.sleep(0.0005)
            os.kill(pid, signal.SIGSTOP)
            while _stat_state(pid) != b"T":
                await anyio.sleep(0.001)
            if state[_WHOLDER] == pid and state[_WMID]:
                return
            os.kill(pid, signal.SIGCONT)


def put_large_items(q: aioipc.Queue[bytes], size: int, n: int) -> None:
    for _ in range(n):
        q.sync.put(b"x" * size)


def get_blocking_until_error(q: aioipc.Queue[Any], waiting: Any, report: aioipc.Queue[Any]) -> None:
    waiting.set()
    try:
        while True:
            q.sync.get(timeout=4)
    except Exception as exc:
        report.sync.put(("blocking", type(exc).__name__, str(exc), time.monotonic()))


def get_async_until_error(q: aioipc.Queue[Any], waiting: Any, report: aioipc.Queue[Any]) -> None:
    async def main() -> None:
        waiting.set()
        try:
            while True:
                with anyio.fail_after(4):
                    await q.get()
        except Exception as exc:
            await report.put(("async", type(exc).__name__, str(exc), time.monotonic()))

    anyio.run(main)


async def test_a_producer_killed_in_the_middle_of_an_item_ends_the_getters_of_every_process() -> (
    None
):
    # Not linked: the queue itself tells. Whichever consumer reads the cut item, both raise.
    q: aioipc.Queue[Any] = aioipc.Queue(ctx=FORK)
    report: aioipc.Queue[Any] = aioipc.Queue(ctx=FORK)
    waiting = [FORK.Event(), FORK.Event()]
    async with (
        aioipc.open_process(get_blocking_until_error, q, waiting[0], report, ctx=FORK),
        aioipc.open_process(get_async_until_error, q, waiting[1], report, ctx=FORK),
    ):
        for event in waiting:
            await wait_until_set(event)
        producer = aioipc.Process(target=put_large_items, args=(q, 32 << 20, 50), ctx=FORK)
        producer.start()
        assert producer.pid is not None
        await stop_in_the_middle_of_an_item(q, producer.pid)
        producer.kill()
        killed_at = time.monotonic()
        assert await producer.wait() == -signal.SIGKILL
        with anyio.fail_after(20):
            outcomes = sorted([await report.get(), await report.get()])
    assert [(kind, error) for kind, error, _, _ in outcomes] == [
        ("async", "BrokenResourceError"),
        ("blocking", "BrokenResourceError"),
    ]
    for _, _, message, raised_at in outcomes:
        assert f"(pid {producer.pid}) died in the middle of writing an item" in message
        assert raised_at - killed_at < 5  # about 50 ms: one slice of the waiters' polls
    producer.close()
    q.close()
    report.close()


def put_until_error(face: str, q: aioipc.Queue[Any], ready: Any, report: aioipc.Queue[Any]) -> None:
    async def put_async() -> None:
        while True:
            with anyio.fail_after(10):
                await q.put("small")

    try:
        ready.set()
        if face == "async":
            anyio.run(put_async)
        while True:
            q.sync.put("small", timeout=10)
    except Exception as exc:
        report.sync.put((face, type(exc).__name__, str(exc), time.monotonic()))
    q.sync.cancel_join_thread()  # nobody will read its items


async def test_putters_waiting_for_room_raise_once_the_stream_is_cut() -> None:
    # Nobody reads: the large item stays half written, the queue full. Killing its writer cuts
    # the stream, so no room will ever come: the waiting putters raise instead of waiting.
    q: aioipc.Queue[Any] = aioipc.Queue(2, ctx=FORK)
    report: aioipc.Queue[Any] = aioipc.Queue(ctx=FORK)
    ready = [FORK.Event(), FORK.Event()]
    producer = aioipc.Process(target=put_large_items, args=(q, 8 << 20, 1), ctx=FORK)
    producer.start()
    state = q.sync._state  # type: ignore[attr-defined]
    with anyio.fail_after(20):
        while not (state[_WHOLDER] == producer.pid and state[_WMID]):
            await anyio.sleep(0.001)
    async with (
        aioipc.open_process(put_until_error, "sync", q, ready[0], report, ctx=FORK),
        aioipc.open_process(put_until_error, "async", q, ready[1], report, ctx=FORK),
    ):
        for event in ready:
            await wait_until_set(event)
        await anyio.sleep(0.2)  # let them settle in their wait for room
        producer.kill()
        killed_at = time.monotonic()
        with anyio.fail_after(20):
            outcomes = sorted([await report.get(), await report.get()])
    assert [(face, error) for face, error, _, _ in outcomes] == [
        ("async", "BrokenResourceError"),
        ("sync", "BrokenResourceError"),
    ]
    for _, _, message, raised_at in outcomes:
        assert f"(pid {producer.pid}) died in the middle of writing an item" in message
        assert raised_at - killed_at < 5
    assert await producer.wait() == -signal.SIGKILL
    producer.close()
    q.close()
    report.close()


def put_items_then_wait(q: aioipc.Queue[Any], n: int, put: Any, go: Any) -> None:
    for i in range(n):
        q.sync.put(i)
    q.sync.close()  # every item is in the pipe
    put.set()
    go.wait(30)


def put_large_then_small(q: aioipc.Queue[Any], size: int) -> None:
    q.sync.put(b"x" * size)
    q.sync.put("after")


async def test_a_linked_producer_stopped_in_the_middle_of_an_item_keeps_its_lock_while_another_exits() -> (  # noqa: E501
    None
):
    q: aioipc.Queue[Any] = aioipc.Queue(ctx=FORK)
    put, go = FORK.Event(), FORK.Event()
    size = 8 << 20  # larger than the pipe: nobody reads yet, so it stays half written
    state = q.sync._state  # type: ignore[attr-defined]
    async with (
        aioipc.open_process(put_items_then_wait, q, 5, put, go, ctx=FORK) as quitter,
    ):
        await wait_until_set(put)
        async with aioipc.open_process(put_large_then_small, q, size, ctx=FORK) as stopped:
            q.link(quitter, stopped)
            assert stopped.pid is not None
            with anyio.fail_after(20):
                while not (state[_WHOLDER] == stopped.pid and state[_WMID]):
                    await anyio.sleep(0.001)
            os.kill(stopped.pid, signal.SIGSTOP)
            try:
                go.set()
                assert await quitter.wait() == 0  # the supervision looks at the locks now
                await anyio.sleep(0.3)
                assert [await q.get() for _ in range(5)] == list(range(5))
                with anyio.move_on_after(0.5) as scope:
                    await q.get()  # its first bytes are there; the rest waits for the writer
                assert scope.cancelled_caught
                assert state[_BROKEN] == 0
                assert state[_WHOLDER] == stopped.pid  # it keeps its lock
            finally:
                os.kill(stopped.pid, signal.SIGCONT)
            with anyio.fail_after(20):
                assert await q.get() == b"x" * size
                assert await q.get() == "after"
                with pytest.raises(aioipc.ShutDown):  # every linked producer exited with 0
                    await q.get()
    q.close()


def put_n_and_hang(q: aioipc.Queue[int], n: int, put: Any) -> None:
    for i in range(n):
        q.sync.put(i)  # the write lock is taken: each item goes to this process's feeder thread
    put.set()
    time.sleep(60)


async def test_items_a_killed_producer_had_not_written_do_not_keep_the_queue_full() -> None:
    # A SIGKILL loses what the producer's feeder thread had not written (as with
    # multiprocessing.Queue), but the slots and counts of those items are freed: other putters
    # find room, and join() does not wait for items that will never come.
    q: aioipc.JoinableQueue[int] = aioipc.JoinableQueue(4, ctx=FORK)
    put = FORK.Event()
    w = q.sync._w  # type: ignore[attr-defined]
    assert w.try_acquire()  # as a producer in the middle of a write
    try:
        producer = aioipc.Process(target=put_n_and_hang, args=(q, 4, put), ctx=FORK)
        producer.start()
        await wait_until_set(put)
        assert q.full()
        producer.kill()
        assert await producer.wait() == -signal.SIGKILL
    finally:
        w.release()
    with anyio.fail_after(5):
        await q.put(42)
        assert await q.get() == 42
        q.task_done()
        await q.join()
    assert q.qsize() == 0
    producer.close()
    q.close()
