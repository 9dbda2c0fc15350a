"""aioipc.Queue and aioipc.JoinableQueue, as seen from one process."""

from __future__ import annotations

import copyreg
import multiprocessing
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from conftest import MakeQueue

import aioipc

pytestmark = pytest.mark.anyio


@pytest.fixture
def queue(make_queue: MakeQueue) -> aioipc.Queue[Any]:
    """A queue of each kind and configuration (see ``make_queue``)."""
    return make_queue()


@pytest.fixture
def mp_queue() -> Iterator[multiprocessing.Queue[Any]]:
    """A multiprocessing queue, closed at teardown (outside the event loop: closing waits for its
    feeder thread)."""
    mp_queue: multiprocessing.Queue[Any] = multiprocessing.Queue()
    yield mp_queue
    mp_queue.close()
    mp_queue.join_thread()


@pytest.fixture
def mp_joinable_queue() -> Iterator[multiprocessing.JoinableQueue[Any]]:
    mp_queue: multiprocessing.JoinableQueue[Any] = multiprocessing.JoinableQueue()
    yield mp_queue
    mp_queue.close()
    mp_queue.join_thread()


class Unpicklable:
    def __init__(self) -> None:
        self.lock = threading.Lock()


class BreaksOnUnpickling:
    """Pickles fine, fails to rebuild in the receiver."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_fail_to_rebuild, ())


def _fail_to_rebuild() -> None:
    raise RuntimeError("cannot rebuild this item")


async def wait_until_waiting(queue: aioipc.Queue[Any], getters: int = 0, putters: int = 0) -> None:
    with anyio.fail_after(5):
        while True:
            stats = queue.statistics()
            if stats.waiting_getters >= getters and stats.waiting_putters >= putters:
                return
            await anyio.sleep(0.001)


# -- put and get --


async def test_get_returns_items_in_the_order_they_were_put(queue: aioipc.Queue[Any]) -> None:
    for i in range(100):
        await queue.put(i)
    assert [await queue.get() for _ in range(100)] == list(range(100))


async def test_get_waits_for_an_item_put_later(queue: aioipc.Queue[Any]) -> None:
    async def put_later() -> None:
        await anyio.sleep(0.05)
        await queue.put("late")

    async with anyio.create_task_group() as tg:
        tg.start_soon(put_later)
        assert await queue.get() == "late"


async def start_getters(
    tg: Any, queue: aioipc.Queue[Any], numbers: range, results: list[tuple[int, int]]
) -> None:
    """Start one getter per number, each once the previous one waits; each records what it got."""

    async def getter(n: int) -> None:
        results.append((n, await queue.get()))

    for n in numbers:
        tg.start_soon(getter, n)
        await wait_until_waiting(queue, getters=n + 1)


async def test_many_waiting_getters_are_served_first_come_first_served(
    queue: aioipc.Queue[Any],
) -> None:
    results: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        await start_getters(tg, queue, range(5), results)
        for i in range(5):
            await queue.put(i)
    assert sorted(results) == [(n, n) for n in range(5)]


async def test_getters_keep_their_order_when_their_wait_moves_to_the_reader_thread(
    queue: aioipc.Queue[Any],
) -> None:
    results: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        await start_getters(tg, queue, range(3), results)
        with anyio.fail_after(5):  # past one slice on the loop, the wait goes to the thread
            while queue.statistics().threads < 1:
                await anyio.sleep(0.01)
        await start_getters(tg, queue, range(3, 6), results)
        for i in range(6):
            await queue.put(i)
    assert sorted(results) == [(n, n) for n in range(6)]


async def test_put_nowait_and_get_nowait_move_an_item_without_waiting(
    queue: aioipc.Queue[Any],
) -> None:
    queue.put_nowait({"a": 1})
    with anyio.fail_after(5):
        while True:
            try:
                assert queue.get_nowait() == {"a": 1}
                break
            except aioipc.Empty:
                await anyio.sleep(0.001)


async def test_get_nowait_on_an_empty_queue_raises_empty(queue: aioipc.Queue[Any]) -> None:
    with pytest.raises(aioipc.Empty):
        queue.get_nowait()


async def test_get_batch_returns_what_is_there_up_to_the_limit(queue: aioipc.Queue[Any]) -> None:
    for i in range(10):
        await queue.put(i)
    batch = await queue.get_batch(4)
    assert batch == list(range(len(batch)))
    assert 1 <= len(batch) <= 4
    rest: list[int] = []
    while len(batch) + len(rest) < 10:
        rest += await queue.get_batch(100)
    assert batch + rest == list(range(10))


async def test_get_batch_waits_for_the_first_item(queue: aioipc.Queue[Any]) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.put, "x")
        assert await queue.get_batch(5) == ["x"]


@pytest.mark.parametrize("bad", [0, -1, 1.5])
async def test_get_batch_rejects_a_bad_size(queue: aioipc.Queue[Any], bad: Any) -> None:
    with pytest.raises(ValueError, match="max_items"):
        await queue.get_batch(bad)


async def test_large_items_arrive_intact(queue: aioipc.Queue[Any]) -> None:
    payloads = [b"x" * (1 << 20), bytes(range(256)) * 300, b""]
    for payload in payloads:
        await queue.put(payload)
    assert [await queue.get() for _ in payloads] == payloads


async def test_async_for_yields_items_until_shutdown_and_drained(queue: aioipc.Queue[Any]) -> None:
    for i in range(3):
        await queue.put(i)
    queue.shutdown()
    assert [item async for item in queue] == [0, 1, 2]


async def test_prefetch_zero_still_delivers_every_item(make_queue: MakeQueue) -> None:
    async with make_queue(prefetch=0) as queue:
        for i in range(20):
            await queue.put(i)
        assert [await queue.get() for _ in range(20)] == list(range(20))
        assert queue.statistics().buffered == 0


async def test_with_prefetch_zero_a_cancelled_get_leaves_the_item_to_other_consumers(
    make_queue: MakeQueue,
) -> None:
    async with make_queue(prefetch=0) as queue:
        with anyio.move_on_after(0.1):
            await queue.get()
        await anyio.sleep(0.1)  # the reader thread has stopped waiting
        queue.sync.put(1)
        assert queue.sync.get(timeout=5) == 1


async def test_negative_prefetch_is_rejected() -> None:
    with pytest.raises(ValueError, match="prefetch"):
        aioipc.Queue(prefetch=-1)


@pytest.mark.parametrize("bad", ["3", 2.0, None])
async def test_a_maxsize_that_is_not_an_int_is_rejected(bad: Any) -> None:
    with pytest.raises(TypeError, match="maxsize"):
        aioipc.Queue(bad)


# -- bounded queues --


async def test_put_nowait_on_a_full_queue_raises_full(make_queue: MakeQueue) -> None:
    async with make_queue(2) as queue:
        queue.put_nowait(1)
        queue.put_nowait(2)
        assert queue.full()
        with pytest.raises(aioipc.Full):
            queue.put_nowait(3)


async def test_put_on_a_full_queue_waits_for_room(make_queue: MakeQueue) -> None:
    async with make_queue(1) as queue:
        await queue.put(1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.put, 2)
            await wait_until_waiting(queue, putters=1)
            assert await queue.get() == 1
            assert await queue.get() == 2


async def test_items_prefetched_by_a_reader_still_count_against_maxsize() -> None:
    # Own queues only: a slot of a wrapped queue is freed by its own get, when the reader takes it.
    async with aioipc.Queue[int](2, prefetch=1) as queue:
        await queue.put(1)
        await queue.put(2)
        assert await queue.get() == 1  # the reader thread has prefetched item 2 as well
        queue.put_nowait(3)
        with pytest.raises(aioipc.Full):
            queue.put_nowait(4)
        assert [await queue.get(), await queue.get()] == [2, 3]


async def test_cancelled_put_on_a_full_queue_does_not_put_the_item(make_queue: MakeQueue) -> None:
    async with make_queue(1) as queue:
        await queue.put(1)
        with anyio.move_on_after(0.1) as scope:
            await queue.put(2)
        assert scope.cancelled_caught
        assert await queue.get() == 1
        await queue.put(3)
        assert await queue.get() == 3
        assert queue.qsize() == 0


async def test_puts_waiting_for_room_go_in_first_come_first_served() -> None:
    # Own queues only: puts waiting for room in a wrapped queue each poll it, in no set order.
    async with aioipc.Queue[int](1) as queue:
        await queue.put(0)
        async with anyio.create_task_group() as tg:
            for i in range(1, 4):
                tg.start_soon(queue.put, i)
                await wait_until_waiting(queue, putters=i)
            assert [await queue.get() for _ in range(4)] == [0, 1, 2, 3]


async def test_a_put_waiting_for_room_is_not_stuck_behind_pending_gets(
    make_queue: MakeQueue,
) -> None:
    async with make_queue(1) as full, make_queue() as other:
        await full.put(0)
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(other.get)
            tg.start_soon(full.put, 1)
            assert await full.get() == 0
            with anyio.fail_after(5):
                assert await full.get() == 1
            for i in range(50):
                await other.put(i)


# -- size --


async def test_qsize_counts_items_put_and_not_yet_taken(queue: aioipc.Queue[Any]) -> None:
    assert queue.qsize() == 0
    assert queue.empty()
    for i in range(5):
        await queue.put(i)
    assert queue.qsize() == 5
    assert not queue.empty()
    await queue.get()
    assert queue.qsize() == 4


async def test_an_unbounded_queue_is_never_full(make_queue: MakeQueue) -> None:
    queue = make_queue(0)
    for i in range(100):
        queue.put_nowait(i)
    assert queue.maxsize == 0
    assert not queue.full()


# -- bad items --


async def test_put_of_an_unpicklable_item_raises_at_the_call_naming_its_type(
    queue: aioipc.Queue[Any],
) -> None:
    with pytest.raises(TypeError, match="Unpicklable"):
        await queue.put(Unpicklable())
    with pytest.raises(TypeError, match="Unpicklable"):
        queue.put_nowait(Unpicklable())
    await queue.put("still works")
    assert await queue.get() == "still works"
    assert queue.qsize() == 0


async def test_put_of_an_unpicklable_item_into_a_full_queue_raises_at_once(
    make_queue: MakeQueue,
) -> None:
    async with make_queue(1) as queue:
        await queue.put(1)
        with anyio.fail_after(5), pytest.raises(TypeError, match="Unpicklable"):
            await queue.put(Unpicklable())


async def test_an_item_that_cannot_be_rebuilt_raises_at_its_get_and_the_queue_goes_on(
    own_queue: aioipc.Queue[Any],
) -> None:
    # Own queues only: a wrapped queue unpickles in its own get(), in the reader thread, where the
    # error ends the reader instead of failing one get.
    queue = own_queue
    await queue.put(1)
    await queue.put(BreaksOnUnpickling())
    await queue.put(3)
    assert await queue.get() == 1
    with pytest.raises(RuntimeError, match="cannot rebuild"):
        await queue.get()
    assert await queue.get() == 3


class RegisteredLater:
    """Pickled through a reducer registered with copyreg after the queue was first used."""

    rebuilt_by_the_reducer = False


def _rebuild_registered_later() -> RegisteredLater:
    obj = RegisteredLater()
    obj.rebuilt_by_the_reducer = True
    return obj


async def test_a_reducer_registered_after_first_use_is_honoured(queue: aioipc.Queue[Any]) -> None:
    await queue.put(1)
    assert await queue.get() == 1
    copyreg.pickle(RegisteredLater, lambda obj: (_rebuild_registered_later, ()))
    try:
        await queue.put(RegisteredLater())
        assert (await queue.get()).rebuilt_by_the_reducer
    finally:
        del copyreg.dispatch_table[RegisteredLater]


# -- shutdown --


async def test_put_after_shutdown_raises_shutdown(queue: aioipc.Queue[Any]) -> None:
    queue.shutdown()
    with pytest.raises(aioipc.ShutDown):
        await queue.put(1)
    with pytest.raises(aioipc.ShutDown):
        queue.put_nowait(1)


async def test_get_after_shutdown_returns_queued_items_then_raises_shutdown(
    queue: aioipc.Queue[Any],
) -> None:
    await queue.put("a")
    await queue.put("b")
    queue.shutdown()
    assert await queue.get() == "a"
    assert await queue.get() == "b"
    with pytest.raises(aioipc.ShutDown):
        await queue.get()
    with pytest.raises(aioipc.ShutDown):
        queue.get_nowait()


async def test_shutdown_wakes_every_waiting_getter(queue: aioipc.Queue[Any]) -> None:
    outcomes: list[str] = []

    async def getter() -> None:
        try:
            await queue.get()
        except aioipc.ShutDown:
            outcomes.append("shut down")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(getter)
            await wait_until_waiting(queue, getters=10)
            queue.shutdown()
    assert outcomes == ["shut down"] * 10


async def test_immediate_shutdown_discards_queued_items(own_queue: aioipc.Queue[Any]) -> None:
    # Own queues only: on a wrapped queue, the discarding get_nowait() calls miss the items still
    # in a multiprocessing.Queue's feeder thread, and qsize() counts the shutdown marker.
    queue = own_queue
    for i in range(10):
        await queue.put(i)
    queue.shutdown(immediate=True)
    with pytest.raises(aioipc.ShutDown):
        await queue.get()
    assert queue.qsize() == 0


async def test_shutdown_wakes_a_put_waiting_for_room() -> None:
    # Own queues only: shutdown() of a full wrapped queue waits to put its marker into it.
    async with aioipc.Queue[int](1) as queue:
        await queue.put(1)

        async def shutdown_soon() -> None:
            await wait_until_waiting(queue, putters=1)
            queue.shutdown()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(shutdown_soon)
                with pytest.raises(aioipc.ShutDown):
                    await queue.put(2)


# -- closing --


async def test_close_wakes_waiting_getters_with_closed_resource_error(
    queue: aioipc.Queue[Any],
) -> None:
    errors: list[BaseException] = []

    async def getter() -> None:
        try:
            await queue.get()
        except aioipc.ClosedResourceError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(getter)
            tg.start_soon(getter)
            await wait_until_waiting(queue, getters=2)
            queue.close()
    assert len(errors) == 2


async def test_close_wakes_a_getter_waiting_on_the_loop_without_waiting_out_its_slice(
    own_queue: aioipc.Queue[Any],
) -> None:
    # A getter watching the pipe from the loop wakes through the queue's own closing eventfd:
    # within a few turns of the loop, not at the end of its 50 ms slice.
    queue = own_queue
    done = anyio.Event()

    async def getter() -> None:
        with pytest.raises(aioipc.ClosedResourceError):
            await queue.get()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(getter)
        await wait_until_waiting(queue, getters=1)
        queue.close()
        for _ in range(100):
            if done.is_set():
                break
            await anyio.lowlevel.checkpoint()
        assert done.is_set()


async def test_every_call_after_close_raises_closed_resource_error(
    queue: aioipc.Queue[Any],
) -> None:
    await queue.aclose()
    with pytest.raises(aioipc.ClosedResourceError):
        await queue.get()
    with pytest.raises(aioipc.ClosedResourceError):
        await queue.put(1)
    with pytest.raises(aioipc.ClosedResourceError):
        queue.put_nowait(1)
    with pytest.raises(aioipc.ClosedResourceError):
        queue.get_nowait()
    with pytest.raises(aioipc.ClosedResourceError):
        await queue.get_batch(2)
    with pytest.raises(aioipc.ClosedResourceError):
        queue.shutdown()


async def test_close_is_idempotent_and_does_not_wait(queue: aioipc.Queue[Any]) -> None:
    await queue.put(1)
    assert await queue.get() == 1
    with anyio.fail_after(2):
        queue.close()
        queue.close()
        await queue.aclose()


async def test_close_in_a_cancelled_scope_still_releases_the_queue(
    queue: aioipc.Queue[Any],
) -> None:
    await queue.put(1)
    await queue.get()
    with anyio.CancelScope() as scope:  # noqa: ASYNC100 (close() must work without awaiting)
        scope.cancel()
        queue.close()
    assert queue.statistics().threads == 0


async def test_close_puts_prefetched_items_back_into_the_queue(queue: aioipc.Queue[Any]) -> None:
    prefetching = aioipc.Queue.wrap(queue.sync, prefetch=4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(prefetching.get)  # waits, so the reader reads with prefetch
        while prefetching.statistics().waiting_getters < 1:
            await anyio.sleep(0.001)
        for i in range(10):
            queue.sync.put(i)
    assert prefetching.statistics().buffered <= 4  # the bound holds at every moment
    prefetching.close()
    with anyio.fail_after(5):
        assert sorted([await queue.get() for _ in range(9)]) == list(range(1, 10))


async def test_closing_a_wrapper_leaves_the_wrapped_queue_open(queue: aioipc.Queue[Any]) -> None:
    aioipc.Queue.wrap(queue.sync).close()
    await queue.put(1)
    assert await queue.get() == 1


def test_an_unclosed_queue_warns_when_collected() -> None:
    def drop_an_unclosed_queue() -> None:
        aioipc.Queue[int]()

    with pytest.warns(ResourceWarning, match="unclosed"):
        drop_an_unclosed_queue()


async def test_statistics_report_waiters_buffer_and_threads(queue: aioipc.Queue[Any]) -> None:
    assert queue.statistics() == aioipc.QueueStatistics(
        waiting_getters=0, waiting_putters=0, buffered=0, qsize=0, threads=0
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.get)
        await wait_until_waiting(queue, getters=1)
        assert queue.statistics().waiting_getters == 1
        with anyio.fail_after(5):  # a get that waits past one slice hands over to the thread
            while queue.statistics().threads < 1:
                await anyio.sleep(0.01)
        assert queue.statistics().waiting_getters == 1
        await queue.put(1)


# -- the sync face and wrapping --


async def test_sync_face_shares_the_queue_with_the_async_face(make_queue: MakeQueue) -> None:
    async with make_queue(prefetch=0) as queue:  # no read-ahead into this process
        queue.sync.put("from sync")
        assert await queue.get() == "from sync"
        await queue.put("from async")
        assert queue.sync.get(timeout=5) == "from async"


async def test_sync_face_honours_shutdown(own_queue: aioipc.Queue[Any]) -> None:
    # Own queues only: the sync face of a wrapped queue is the multiprocessing queue itself.
    queue = own_queue
    queue.sync.put(1)
    queue.shutdown()
    assert queue.sync.get(timeout=5) == 1
    with pytest.raises(aioipc.ShutDown):
        queue.sync.get(timeout=5)
    with pytest.raises(aioipc.ShutDown):
        queue.sync.put(2)


async def test_wrap_adopts_a_multiprocessing_queue(mp_queue: multiprocessing.Queue[Any]) -> None:
    async with aioipc.Queue.wrap(mp_queue) as queue:
        await queue.put(1)
        assert mp_queue.get(timeout=5) == 1
        mp_queue.put(2)
        assert await queue.get() == 2
        assert queue.sync is mp_queue


async def test_wrap_adopts_a_manager_queue_proxy() -> None:
    managed = MakeQueue("manager", prefetch=0, maxsize=2)
    try:
        async with managed() as queue:
            await queue.put("a")
            await queue.put("b")
            assert queue.qsize() == 2
            assert await queue.get() == "a"
            assert await queue.get() == "b"
            queue.shutdown()
            with pytest.raises(aioipc.ShutDown):
                await queue.get()
    finally:
        managed.close()


async def test_wrap_rejects_what_is_not_a_queue() -> None:
    with pytest.raises(TypeError, match="not a queue"):
        aioipc.Queue.wrap(object())


async def test_a_queue_pickles_only_to_start_a_process(queue: aioipc.Queue[Any]) -> None:
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(queue)


# -- joinable --


async def test_join_returns_once_every_item_is_marked_done(make_queue: MakeQueue) -> None:
    async with make_queue.joinable() as queue:
        for i in range(3):
            await queue.put(i)
        joined = anyio.Event()

        async def join() -> None:
            await queue.join()
            joined.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(join)
            for _ in range(3):
                await queue.get()
                await anyio.sleep(0.01)
                assert not joined.is_set()
                queue.task_done()
            with anyio.fail_after(5):
                await joined.wait()


async def test_join_on_a_queue_with_no_unfinished_items_returns_at_once(
    make_queue: MakeQueue,
) -> None:
    async with make_queue.joinable() as queue:
        with anyio.fail_after(1):
            await queue.join()


async def test_task_done_called_too_often_raises_value_error() -> None:
    # Own queues only: a wrapped queue raises its own error (a manager's, RemoteError).
    async with aioipc.JoinableQueue[int]() as queue:
        await queue.put(1)
        await queue.get()
        queue.task_done()
        with pytest.raises(ValueError, match="more times"):
            queue.task_done()


async def test_join_returns_once_shut_down_and_drained() -> None:
    # Own queues only: on a wrapped queue, the discarding get_nowait() calls miss the items still
    # in a multiprocessing.Queue's feeder thread.
    async with aioipc.JoinableQueue[int]() as queue:
        await queue.put(1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.join)
            await anyio.sleep(0.05)
            queue.shutdown(immediate=True)
        assert queue.qsize() == 0


async def test_join_returns_once_the_items_are_done_after_a_shutdown(make_queue: MakeQueue) -> None:
    async with make_queue.joinable() as queue:
        await queue.put(1)
        queue.shutdown()
        assert await queue.get() == 1
        queue.task_done()
        with pytest.raises(aioipc.ShutDown):
            await queue.get()
        with anyio.fail_after(5):
            await queue.join()


async def test_cancelled_join_changes_nothing(make_queue: MakeQueue) -> None:
    async with make_queue.joinable() as queue:
        await queue.put(1)
        with anyio.move_on_after(0.05):
            await queue.join()
        await queue.get()
        queue.task_done()
        with anyio.fail_after(5):
            await queue.join()


async def test_wrap_adopts_a_multiprocessing_joinable_queue(
    mp_joinable_queue: multiprocessing.JoinableQueue[int],
) -> None:
    async with aioipc.JoinableQueue.wrap(mp_joinable_queue) as queue:
        await queue.put(1)
        assert await queue.get() == 1
        queue.task_done()
        with anyio.fail_after(5):
            await queue.join()


async def test_joinable_wrap_rejects_a_queue_without_task_done(
    mp_queue: multiprocessing.Queue[int],
) -> None:
    with pytest.raises(TypeError, match="task_done"):
        aioipc.JoinableQueue.wrap(mp_queue)
