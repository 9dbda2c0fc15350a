"""The blocking face of a queue (``queue.sync``), for synchronous code in any process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import aioipc


@pytest.fixture
def queue() -> Iterator[aioipc.SyncQueue[int]]:
    q: aioipc.SyncQueue[int] = aioipc.SyncQueue()
    yield q
    q.close()


def test_put_then_get_returns_the_items_in_order(queue: aioipc.SyncQueue[int]) -> None:
    for i in range(10):
        queue.put(i)
    assert [queue.get(timeout=5) for _ in range(10)] == list(range(10))


def test_get_with_a_timeout_on_an_empty_queue_raises_empty(queue: aioipc.SyncQueue[int]) -> None:
    started = time.monotonic()
    with pytest.raises(aioipc.Empty):
        queue.get(timeout=0.1)
    assert time.monotonic() - started >= 0.09
    with pytest.raises(aioipc.Empty):
        queue.get_nowait()
    with pytest.raises(aioipc.Empty):
        queue.get(block=False)


def test_put_with_a_timeout_on_a_full_queue_raises_full() -> None:
    queue: aioipc.SyncQueue[int] = aioipc.SyncQueue(1)
    try:
        queue.put(1)
        assert queue.full()
        with pytest.raises(aioipc.Full):
            queue.put(2, timeout=0.1)
        with pytest.raises(aioipc.Full):
            queue.put_nowait(2)
        assert queue.get(timeout=5) == 1
        queue.put_nowait(2)
        assert queue.maxsize == 1
    finally:
        queue.close()


def test_sizes(queue: aioipc.SyncQueue[int]) -> None:
    assert queue.empty()
    queue.put(1)
    queue.put(2)
    assert queue.qsize() == 2
    assert not queue.empty()
    assert not queue.full()


def test_shutdown_rejects_puts_and_ends_gets_once_drained(queue: aioipc.SyncQueue[int]) -> None:
    queue.put(1)
    queue.shutdown()
    assert queue.is_shutdown
    with pytest.raises(aioipc.ShutDown):
        queue.put(2)
    assert queue.get(timeout=5) == 1
    with pytest.raises(aioipc.ShutDown):
        queue.get(timeout=5)


def test_get_after_shutdown_waits_for_items_still_on_their_way(
    queue: aioipc.SyncQueue[bytes],
) -> None:
    item = b"x" * 100_000  # large: written by the feeder thread, not by put() itself
    queue._wlock.acquire()  # hold the write lock: the feeder cannot write yet
    try:
        queue.put(item)
        queue.shutdown()
        with pytest.raises(aioipc.Empty):  # not ShutDown: an item is still on its way
            queue.get(timeout=0.2)
    finally:
        queue._wlock.release()
    assert queue.get(timeout=5) == item
    with pytest.raises(aioipc.ShutDown):
        queue.get(timeout=5)


def test_items_put_while_the_pipe_is_full_arrive_whole_and_in_order(
    queue: aioipc.SyncQueue[bytes],
) -> None:
    items = [i.to_bytes(4, "big") * 256 for i in range(1_000)]  # 1 MiB in 1 KiB items
    for item in items:
        queue.put(item)  # never waits: what the pipe has no room for waits in this process
    assert [queue.get(timeout=5) for _ in items] == items


def test_small_and_large_items_queued_behind_a_busy_writer_keep_their_order(
    queue: aioipc.SyncQueue[bytes],
) -> None:
    items = [b"a", b"b" * 100_000, b"c", b"d" * 3_000, b"e" * 200_000, b"f"]
    queue._wlock.acquire()  # another writer holds the write lock: every item waits here
    try:
        for item in items:
            queue.put(item)
        assert queue.qsize() == len(items)
    finally:
        queue._wlock.release()
    assert [queue.get(timeout=5) for _ in items] == items


def test_a_new_queue_is_not_shut_down(queue: aioipc.SyncQueue[int]) -> None:
    assert not queue.is_shutdown


def test_immediate_shutdown_discards_the_items(queue: aioipc.SyncQueue[int]) -> None:
    queue.put(1)
    queue.shutdown(immediate=True)
    assert queue.qsize() == 0
    with pytest.raises(aioipc.ShutDown):
        queue.get(timeout=5)


def test_an_unpicklable_item_raises_type_error_and_the_queue_goes_on(
    queue: aioipc.SyncQueue[object],
) -> None:
    with pytest.raises(TypeError, match="lambda"):
        queue.put(lambda: None)
    queue.put(1)
    assert queue.get(timeout=5) == 1


def test_calls_after_close_raise_value_error() -> None:
    queue: aioipc.SyncQueue[int] = aioipc.SyncQueue()
    queue.close()
    queue.close()
    with pytest.raises(ValueError, match="closed"):
        queue.put(1)
    with pytest.raises(ValueError, match="closed"):
        queue.get()


def test_task_done_and_join_on_a_joinable_queue() -> None:
    queue: aioipc.SyncQueue[int] = aioipc.SyncQueue(joinable=True)
    try:
        queue.put(1)
        assert queue.join(timeout=0.05) is False
        queue.get(timeout=5)
        queue.task_done()
        assert queue.join(timeout=5) is True
        with pytest.raises(ValueError, match="more times"):
            queue.task_done()
    finally:
        queue.close()


def test_task_done_and_join_need_a_joinable_queue(queue: aioipc.SyncQueue[int]) -> None:
    with pytest.raises(ValueError, match="JoinableQueue"):
        queue.task_done()
    with pytest.raises(ValueError, match="JoinableQueue"):
        queue.join()


def test_cancel_join_thread_and_join_thread_are_accepted(queue: aioipc.SyncQueue[int]) -> None:
    queue.put(1)
    queue.cancel_join_thread()
    queue.join_thread()
    assert queue.get(timeout=5) == 1


def test_repr_names_the_public_class(queue: aioipc.SyncQueue[int]) -> None:
    assert repr(queue).startswith("<aioipc.SyncQueue maxsize=0")
