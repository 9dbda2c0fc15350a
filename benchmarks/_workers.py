"""What runs in the benchmark's processes: payloads, producer/echo/consumer loops, probes.

Child-process targets live here, at module level, so that the forkserver (which preloads this
module) and spawn can import them by name. The consumer loops are shared by the parent and the
consumer children, so every variant runs the same code around the call it measures.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

#: The payloads, built once per process so every variant sends the very same objects.
PAYLOADS: dict[str, object] = {
    "small int": 1,
    "1 KiB": bytes(1024),
    "64 KiB": bytes(64 * 1024),
    "1 MiB": bytes(1024 * 1024),
}

#: Ends the stream when several consumer processes share a queue.
SENTINEL = None

#: The event loops a variant can run on.
LOOPS = ("asyncio", "uvloop", "trio")

#: ``(first item time, last item time, items between them)``: timing starts at the first item,
#: so that process and thread start-up are never part of a figure.
Span = tuple[float, float, int]

now = time.perf_counter


def run_on(loop: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion on a fresh event loop of the given kind."""
    if loop not in LOOPS:
        raise ValueError(f"unknown event loop {loop!r}")
    backend = "trio" if loop == "trio" else "asyncio"
    options = {"use_uvloop": True} if loop == "uvloop" else {}
    return anyio.run(fn, backend=backend, backend_options=options)


def sync_face(channel: Any) -> Any:
    """The blocking object behind a channel (``.sync`` for aioipc objects, else the object)."""
    return getattr(channel, "sync", channel)


def blocking_calls(channel: Any, kind: str) -> tuple[Callable[[Any], None], Callable[[], Any]]:
    """The blocking ``(put, get)`` of a queue, or ``(send, recv)`` of a connection."""
    face = sync_face(channel)
    if kind == "queue":
        return face.put, face.get
    return face.send, face.recv


def async_get(channel: Any, kind: str, variant: str) -> Callable[[], Awaitable[Any]]:
    """The awaitable ``get``/``recv`` that a variant measures."""
    if variant == "to_thread":
        get = blocking_calls(channel, kind)[1]
        return lambda: asyncio.to_thread(get)
    if variant == "aioprocessing":
        return channel.coro_get if kind == "queue" else channel.coro_recv  # type: ignore[no-any-return]
    return channel.get if kind == "queue" else channel.recv  # type: ignore[no-any-return]


def async_put(channel: Any, kind: str, variant: str) -> Callable[[Any], Awaitable[None]]:
    """The awaitable ``put``/``send`` that a variant measures."""
    if variant == "to_thread":
        put = blocking_calls(channel, kind)[0]

        async def put_sync(item: Any) -> None:  # an unbounded put never blocks for long
            put(item)

        return put_sync
    if variant == "aioprocessing":
        return channel.coro_put if kind == "queue" else channel.coro_send  # type: ignore[no-any-return]
    return channel.put if kind == "queue" else channel.send  # type: ignore[no-any-return]


def loop_of(variant: str) -> str | None:
    """The event loop a variant runs on (None: a plain synchronous loop, on aioipc's channel or
    on multiprocessing's own queue)."""
    if variant in ("sync", "mp"):
        return None
    return variant if variant in LOOPS else "asyncio"


# -- consuming --------------------------------------------------------------------------------


def consume_sync(get: Callable[[], Any], n: int) -> Span:
    get()
    start = now()
    for _ in range(n - 1):
        get()
    return start, now(), n - 1


async def consume_async(get: Callable[[], Awaitable[Any]], n: int) -> Span:
    await get()
    start = now()
    for _ in range(n - 1):
        await get()
    return start, now(), n - 1


def consume_sync_until_sentinel(get: Callable[[], Any]) -> Span:
    start = last = 0.0
    count = 0
    while get() is not SENTINEL:
        last = now()
        if not count:
            start = last
        count += 1
    return start, last, count - 1


async def consume_async_until_sentinel(get: Callable[[], Awaitable[Any]]) -> Span:
    start = last = 0.0
    count = 0
    while (await get()) is not SENTINEL:
        last = now()
        if not count:
            start = last
        count += 1
    return start, last, count - 1


def consume(channel: Any, kind: str, variant: str, n: int | None) -> Span:
    """Consume ``n`` items (None: until the sentinel) the way ``variant`` does."""
    loop = loop_of(variant)
    if loop is None:
        get = blocking_calls(channel, kind)[1]
        return consume_sync(get, n) if n is not None else consume_sync_until_sentinel(get)

    async def main() -> Span:
        aget = async_get(channel, kind, variant)
        if n is None:
            return await consume_async_until_sentinel(aget)
        return await consume_async(aget, n)

    return run_on(loop, main)


def consumer_child(
    channel: Any, kind: str, variant: str, barrier: Any, results: Connection
) -> None:
    """A consumer process: take items until the sentinel, report the span, give back the rest."""
    barrier.wait()
    span = consume(channel, kind, variant, None)
    close_channel(channel)
    results.send(span)
    results.close()


def close_channel(channel: Any) -> None:
    """Release a channel in this process (aioipc objects give prefetched items back)."""
    executor = getattr(channel, "_executor", None)  # aioprocessing's per-object thread pool
    if executor is not None:
        executor.shutdown(wait=False)
    close = getattr(channel, "close", None)
    if close is not None:
        close()
    join_thread = getattr(channel, "join_thread", None)  # multiprocessing.Queue's feeder
    if join_thread is not None:
        join_thread()


# -- child processes --------------------------------------------------------------------------


def producer_child(channel: Any, kind: str, payload: str, n: int, barrier: Any) -> None:
    """A producer process: put ``n`` payloads as fast as the blocking face allows."""
    put = blocking_calls(channel, kind)[0]
    item = PAYLOADS[payload]
    barrier.wait()
    for _ in range(n):
        put(item)


def sync_consumer_child(channel: Any, kind: str, n: int, barrier: Any, results: Connection) -> None:
    """A synchronous consumer process that reports the span of its ``n`` items."""
    get = blocking_calls(channel, kind)[1]
    barrier.wait()
    results.send(consume_sync(get, n))
    results.close()


def echo_child(request: Any, reply: Any, kind: str) -> None:
    """Send back every item received, until the sentinel."""
    put = blocking_calls(reply, kind)[0]
    get = blocking_calls(request, kind)[1]
    while (item := get()) is not SENTINEL:
        put(item)


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def os_threads() -> int:
    """Threads of this process, as the kernel counts them."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def pending_gets_child(variant: str, loop: str, n: int, results: Connection) -> None:
    """Park ``n`` tasks in ``get()`` and report the threads and memory that added.

    ``variant`` is ``"aioipc"`` or else the loop's own in-process queue (an asyncio.Queue, or a
    trio memory channel). The tasks are the loop's native ones, so that only the queue differs.
    """
    import aioipc

    queue: aioipc.Queue[int] | None = aioipc.Queue() if variant == "aioipc" else None

    async def main() -> tuple[int, int]:
        threads, rss = os_threads(), rss_bytes()
        if loop == "trio":
            import trio

            _send, receive = trio.open_memory_channel[int](0)
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(queue.get if queue is not None else receive.receive)
                await trio.sleep(0.05)  # every task has run up to its wait
                added = os_threads() - threads, rss_bytes() - rss
                nursery.cancel_scope.cancel()
            return added
        local: asyncio.Queue[int] = asyncio.Queue()
        tasks = [asyncio.ensure_future((queue or local).get()) for _ in range(n)]
        await asyncio.sleep(0.05)
        added = os_threads() - threads, rss_bytes() - rss
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return added

    try:
        report = run_on(loop, main)
    finally:
        if queue is not None:
            queue.close()
    results.send(report)
    results.close()


# -- work sharing -----------------------------------------------------------------------------


def job_consumer_child(
    queue: Any, variant: str, job_seconds: float, barrier: Any, results: Connection
) -> None:
    """Take jobs until the sentinel, "working" ``job_seconds`` on each (a sleep, so that the
    figure shows how the jobs are shared, not how 2 cores share 4 processes); report how many."""
    barrier.wait()
    loop = loop_of(variant)
    done = 0
    if loop is None:
        get = blocking_calls(queue, "queue")[1]
        while get() is not SENTINEL:
            time.sleep(job_seconds)
            done += 1
    else:

        async def main() -> int:
            count = 0
            aget = async_get(queue, "queue", variant)
            while await aget() is not SENTINEL:
                await anyio.sleep(job_seconds)
                count += 1
            return count

        done = run_on(loop, main)
    close_channel(queue)
    results.send(done)
    results.close()
