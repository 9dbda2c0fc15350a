"""Type-only checks of the public generics: mypy checks this file; nothing runs it."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import aioipc


async def queues() -> None:
    queue: aioipc.Queue[int] = aioipc.Queue()
    assert_type(await queue.get(), int)
    assert_type(queue.get_nowait(), int)
    assert_type(await queue.get_batch(10), list[int])
    assert_type(queue.sync.get(), int)
    assert_type(queue.statistics(), aioipc.QueueStatistics)
    async for item in queue:
        assert_type(item, int)
    async with aioipc.JoinableQueue[str]() as joinable:
        assert_type(joinable, aioipc.JoinableQueue[str])
        assert_type(await joinable.get(), str)
        await joinable.join()
        assert_type(joinable.sync.get(), str)
        joinable.sync.task_done()  # the blocking face of a joinable queue has task_done and join
        joinable.sync.join()
    queue.sync.cancel_join_thread()  # and every blocking face has multiprocessing's close methods
    queue.sync.close()
    assert_type(aioipc.Queue.wrap(object()), aioipc.Queue[Any])
    assert_type(aioipc.JoinableQueue.wrap(object()), aioipc.JoinableQueue[Any])
    await queue.put(1)
    await queue.put("no")  # type: ignore[arg-type]
