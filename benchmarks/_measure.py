"""One measurement each: build fresh channels, start the children, time the transfer, clean up.

Every measurement gets new channels and new child processes (started by a forkserver that has
preloaded the benchmark modules, so a start costs a few milliseconds), and times only the transfer:
from the first item the consumer receives to the last. A measurement that hangs is interrupted
after a generous deadline, so that one broken case cannot stop the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from types import FrameType
from typing import Any

import anyio

import aioipc

from . import _workers as w

#: Seconds a single measurement may take before it is abandoned as hung.
DEADLINE = 60.0

#: A round trip of the ping-pong carries this object.
PING = 1


@dataclass
class Sample:
    """One measurement: the figure, and the work and time behind it (to size the next run)."""

    value: float
    items: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


#: glibc's malloc hands large blocks back to the kernel and adapts that threshold to what the
#: process freed before, so the cost of a 1 MiB item (page faults or none) would depend on the
#: cases run earlier. Fixed thresholds make every measurement start from the same allocator.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 64 << 20, "MALLOC_TRIM_THRESHOLD_": 128 << 20}
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # M_* from malloc.h


def steady_allocator() -> bool:
    """Fix glibc's malloc thresholds here and in every child to come; False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    for name, value in MALLOC_SETTINGS.items():
        os.environ[name] = str(value)  # read at start-up by the forkserver and its children
        mallopt(_MALLOPT[name], value)
    return True


def make_context() -> ForkServerContext:
    """The start method for every child: a forkserver that has imported the benchmark code."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["benchmarks._workers", "aioipc", "aioprocessing", "trio", "uvloop"])
    return ctx


CTX = make_context()


def pipe_available() -> bool:
    """True once the package provides ``aioipc.Pipe``."""
    return getattr(aioipc, "Pipe", None) is not None


# -- plumbing ---------------------------------------------------------------------------------


class Hung(Exception):
    """Raised when a measurement exceeds :data:`DEADLINE`."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hung(f"no result within {DEADLINE:.0f} s")


@contextlib.contextmanager
def deadline() -> Iterator[None]:
    """Interrupt the main thread with :class:`Hung` if the block takes longer than DEADLINE."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Children:
    """Child processes of one measurement: joined on exit, killed if they do not end."""

    def __init__(self) -> None:
        self._procs: list[Any] = []
        self._closables: list[Any] = []

    def start(self, target: Callable[..., None], *args: Any) -> Any:
        proc = CTX.Process(target=target, args=args, daemon=True)
        proc.start()
        self._procs.append(proc)
        return proc

    def result_pipe(self) -> tuple[Connection, Connection]:
        """A one-way pipe for a child to report back on."""
        receiver, sender = CTX.Pipe(duplex=False)
        self._closables += [receiver, sender]
        return receiver, sender

    def own(self, *channels: Any) -> None:
        """Channels to close on exit (after the children are gone)."""
        self._closables += channels

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for proc in self._procs:
            proc.join(0 if exc_info[0] is not None else 10.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for channel in reversed(self._closables):
            w.close_channel(channel)


def make_queue(variant: str, maxsize: int = 0, prefetch: int = 0) -> Any:
    """A fresh queue for a variant: aioipc's (default settings unless ``prefetch``), or the
    peer's own."""
    if variant == "mp":
        return CTX.Queue(maxsize)
    if variant == "aioprocessing":
        import aioprocessing

        return aioprocessing.AioQueue(maxsize, context=CTX)
    return aioipc.Queue(maxsize, ctx=CTX, prefetch=prefetch)


def make_pipe(variant: str, duplex: bool) -> tuple[Any, Any]:
    """A fresh pipe for a variant; with ``duplex=False`` the first end receives."""
    if variant == "aioprocessing":
        import aioprocessing

        return aioprocessing.AioPipe(duplex)  # type: ignore[no-any-return]
    pipe = getattr(aioipc, "Pipe", None)
    if pipe is None:
        raise RuntimeError("aioipc.Pipe is not built yet")
    return pipe(duplex, ctx=CTX)  # type: ignore[no-any-return]


def _rate(spans: list[w.Span]) -> Sample:
    start = min(span[0] for span in spans)
    end = max(span[1] for span in spans)
    items = sum(span[2] for span in spans)
    seconds = max(end - start, 1e-9)
    return Sample(items / seconds, items, seconds)


# -- the measurements -------------------------------------------------------------------------


def throughput(
    kind: str,
    variant: str,
    payload: str,
    n: int,
    *,
    producers: int = 1,
    consumers: int = 1,
    prefetch: int = 0,
) -> Sample:
    """Items per second from ``producers`` child processes to ``consumers`` consumers (this
    process if 1, else child processes that stop at a sentinel each)."""
    with deadline(), Children() as children:
        if kind == "queue":
            receiver = sender = make_queue(variant, prefetch=prefetch)
            children.own(receiver)
        else:
            receiver, sender = make_pipe(variant, duplex=False)
            children.own(receiver, sender)
        barrier = CTX.Barrier(producers + (consumers if consumers > 1 else 0) + 1)
        shares = [n // producers + (i < n % producers) for i in range(producers)]
        producing = [
            children.start(w.producer_child, sender, kind, payload, share, barrier)
            for share in shares
        ]
        if consumers == 1:
            barrier.wait(DEADLINE)
            spans = [w.consume(receiver, kind, variant, n)]
        else:
            pipes = [children.result_pipe() for _ in range(consumers)]
            for _, report in pipes:
                children.start(w.consumer_child, receiver, kind, variant, barrier, report)
            barrier.wait(DEADLINE)
            for proc in producing:  # the consumers stop at their sentinels, put after every item
                proc.join()
            put = w.blocking_calls(sender, kind)[0]
            for _ in range(consumers):
                put(w.SENTINEL)
            spans = [result.recv() for result, _ in pipes]
        return _rate(spans)


def async_producer(variant: str, maxsize: int, payload: str, n: int) -> Sample:
    """Items per second from a producer in this process to a synchronous consumer child."""
    with deadline(), Children() as children:
        queue = make_queue(variant, maxsize)
        children.own(queue)
        barrier = CTX.Barrier(2)
        result, report = children.result_pipe()
        children.start(w.sync_consumer_child, queue, "queue", n, barrier, report)
        item = w.PAYLOADS[payload]
        loop = w.loop_of(variant)
        barrier.wait(DEADLINE)
        if loop is None:
            put = queue.sync.put
            for _ in range(n):
                put(item)
        else:

            async def main() -> None:
                aput = w.async_put(queue, "queue", variant)
                for _ in range(n):
                    await aput(item)

            w.run_on(loop, main)
        return _rate([result.recv()])


def round_trip(kind: str, variant: str, n: int) -> Sample:
    """Microseconds per ping-pong with an echoing child (the first round trip is not timed)."""
    with deadline(), Children() as children:
        if kind == "queue":
            request, reply = make_queue(variant), make_queue(variant)
            children.own(request, reply)
            mine = (request, reply)
            children.start(w.echo_child, request, reply, kind)
        else:
            here, there = make_pipe(variant, duplex=True)
            children.own(here, there)
            mine = (here, here)
            children.start(w.echo_child, there, there, kind)
        loop = w.loop_of(variant)
        if loop is None:
            put, get = w.blocking_calls(mine[0], kind)[0], w.blocking_calls(mine[1], kind)[1]
            put(PING)
            get()
            start = w.now()
            for _ in range(n):
                put(PING)
                get()
            seconds = w.now() - start
        else:

            async def main() -> float:
                aput = w.async_put(mine[0], kind, variant)
                aget = w.async_get(mine[1], kind, variant)
                await aput(PING)
                await aget()
                start = w.now()
                for _ in range(n):
                    await aput(PING)
                    await aget()
                return w.now() - start

            seconds = w.run_on(loop, main)
        w.blocking_calls(mine[0], kind)[0](w.SENTINEL)
        return Sample(seconds / n * 1e6, n, seconds)


def heartbeat(loop: str, payload: str, n: int) -> Sample:
    """The p99 lag (ms) of a 1 ms heartbeat task while another task consumes at full speed."""
    with deadline(), Children() as children:
        queue = make_queue("aioipc")
        children.own(queue)
        barrier = CTX.Barrier(2)
        children.start(w.producer_child, queue, "queue", payload, n, barrier)
        barrier.wait(DEADLINE)

        async def main() -> tuple[w.Span, list[tuple[float, float]]]:
            beats: list[tuple[float, float]] = []

            async def beat() -> None:
                while True:
                    before = w.now()
                    await anyio.sleep(0.001)
                    after = w.now()
                    beats.append((after, after - before - 0.001))

            async with anyio.create_task_group() as tg:
                tg.start_soon(beat)
                span = await w.consume_async(queue.get, n)
                tg.cancel_scope.cancel()
            return span, beats

        span, beats = w.run_on(loop, main)
        lags = [lag for at, lag in beats if span[0] <= at <= span[1]] or [0.0]
        p99 = statistics.quantiles(lags, n=100)[98] if len(lags) > 1 else lags[0]
        rate = _rate([span])
        return Sample(
            p99 * 1e3,
            rate.items,
            rate.seconds,
            {"max_lag_ms": max(lags) * 1e3, "items_per_s": rate.value, "beats": len(lags)},
        )


def pending_gets(variant: str, loop: str, n: int) -> Sample:
    """Threads and MB added by ``n`` tasks parked in ``get()`` (measured in a fresh child)."""
    with deadline(), Children() as children:
        result, report = children.result_pipe()
        start = w.now()
        children.start(w.pending_gets_child, variant, loop, n, report)
        threads, rss = result.recv()
        seconds = w.now() - start
        return Sample(rss / 2**20, n, seconds, {"threads": float(threads)})


def proxy_drain(prefetch: int, n: int) -> Sample:
    """Items per second an asyncio consumer here takes from a manager's queue proxy that holds
    ``n`` items, through ``aioipc.Queue.wrap(proxy, prefetch=...)``: every get of a proxy is a
    round trip to the manager process, made by the reader thread."""
    with deadline(), CTX.Manager() as manager:
        proxy = manager.Queue()
        for i in range(n):
            proxy.put(i)
        queue = aioipc.Queue.wrap(proxy, prefetch=prefetch)

        async def drain() -> float:
            started = time.perf_counter()
            for _ in range(n):
                await queue.get()
            return time.perf_counter() - started

        try:
            seconds = asyncio.run(drain())
        finally:
            queue.close()
        return Sample(n / seconds, n, seconds)


def work_sharing(
    variant: str, prefetch: int, n: int, *, workers: int, job_seconds: float
) -> Sample:
    """Makespan of ``n`` jobs of ``job_seconds`` each, queued at once and taken by ``workers``
    consumer processes; each worker's count goes into the sample's extras (``share_0``...,
    largest first)."""
    with deadline(), Children() as children:
        queue = make_queue(variant, prefetch=prefetch)
        children.own(queue)
        put = w.blocking_calls(queue, "queue")[0]
        for i in range(n):
            put(i)
        for _ in range(workers):
            put(w.SENTINEL)
        time.sleep(0.05)  # every job is in the pipe before the workers start
        barrier = CTX.Barrier(workers + 1)
        pipes = [children.result_pipe() for _ in range(workers)]
        for _, report in pipes:
            children.start(w.job_consumer_child, queue, variant, job_seconds, barrier, report)
        barrier.wait(DEADLINE)
        started = time.perf_counter()
        shares = sorted((result.recv() for result, _ in pipes), reverse=True)
        makespan = time.perf_counter() - started
        extra = {f"share_{i}": float(share) for i, share in enumerate(shares)}
        return Sample(makespan, n, makespan, extra)
