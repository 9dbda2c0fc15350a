"""aioipc pipes between real processes, under every start method."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import trio
from _helpers import join, start

import aioipc

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MB = 1024 * 1024


# -- child process bodies (module level, so that spawn can import them) --


def echo_sync(conn: aioipc.Connection[Any, Any], other: aioipc.Connection[Any, Any]) -> None:
    """Echo every message through the blocking face until EOF."""
    other.close()  # this process's copy of the parent's end (inherited under fork)
    sync = conn.sync
    try:
        while True:
            sync.send_bytes(sync.recv_bytes())
    except EOFError:
        pass
    conn.close()


async def echo_until_eof(conn: aioipc.Connection[Any, Any]) -> None:
    async with conn:
        async for message in conn:
            await conn.send(message)


def echo_async(
    loop: str, conn: aioipc.Connection[Any, Any], other: aioipc.Connection[Any, Any]
) -> None:
    """Echo every message with this process's own event loop until EOF."""
    other.close()
    if loop == "trio":
        trio.run(echo_until_eof, conn)
    else:
        asyncio.run(echo_until_eof(conn))


def exit_at_once(conn: aioipc.Connection[Any, Any], other: aioipc.Connection[Any, Any]) -> None:
    other.close()


def sleep_forever(conn: aioipc.Connection[Any, Any], other: aioipc.Connection[Any, Any]) -> None:
    other.close()
    conn.sync.send("ready")
    time.sleep(60)


# -- helpers --


@asynccontextmanager
async def heartbeat(period: float = 0.005) -> AsyncIterator[list[float]]:
    """Measure the gaps between ticks of a task that sleeps ``period`` in a loop."""
    gaps: list[float] = []

    async def beat() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(period)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(beat)
        yield gaps
        tg.cancel_scope.cancel()


# -- talking to a child --


async def test_a_child_echoes_through_the_sync_face_and_the_parent_awaits(ctx: Any) -> None:
    mine, theirs = aioipc.Pipe(ctx=ctx)
    process = start(ctx, echo_sync, theirs, mine)
    theirs.close()
    async with mine:
        for size in (0, 10, 5_000, 300_000, 3 * MB):
            message = os.urandom(size)
            await mine.send_bytes(message)
            assert await mine.recv_bytes() == message
    await join(process)
    assert process.exitcode == 0


@pytest.mark.parametrize("child_loop", ["asyncio", "trio"])
async def test_a_child_runs_its_own_event_loop_on_its_end(ctx: Any, child_loop: str) -> None:
    mine, theirs = aioipc.Pipe(ctx=ctx)
    process = start(ctx, echo_async, child_loop, theirs, mine)
    theirs.close()
    messages = [{"n": i, "pad": "x" * (i * 1000)} for i in range(50)] + [b"y" * 3 * MB]
    async with mine, anyio.create_task_group() as tg:

        async def send_all() -> None:
            for message in messages:
                await mine.send(message)

        tg.start_soon(send_all)
        assert [await mine.recv() for _ in messages] == messages
    await join(process)
    assert process.exitcode == 0


# -- end of file --


async def test_recv_raises_eoferror_once_the_child_has_exited(ctx: Any) -> None:
    mine, theirs = aioipc.Pipe(ctx=ctx)
    process = start(ctx, exit_at_once, theirs, mine)
    theirs.close()  # the trap: without this, EOF never arrives
    async with mine:
        await join(process)
        with anyio.fail_after(30), pytest.raises(EOFError):
            await mine.recv()


async def test_a_waiting_recv_gets_eoferror_once_the_child_is_killed(
    ctx: Any,
) -> None:
    mine, theirs = aioipc.Pipe(ctx=ctx)
    process = start(ctx, sleep_forever, theirs, mine)
    theirs.close()
    async with mine:
        assert await mine.recv() == "ready"
        async with anyio.create_task_group() as tg:
            tg.start_soon(_kill_after, process, 0.05)
            with anyio.fail_after(30), pytest.raises(EOFError):
                await mine.recv()
    await join(process)
    assert process.exitcode == -signal.SIGKILL


async def _kill_after(process: multiprocessing.process.BaseProcess, delay: float) -> None:
    await anyio.sleep(delay)
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)


async def test_eof_waits_while_the_parent_still_holds_a_copy_of_the_childs_end(ctx: Any) -> None:
    mine, theirs = aioipc.Pipe(ctx=ctx)
    process = start(ctx, exit_at_once, theirs, mine)
    async with mine:
        await join(process)
        with anyio.move_on_after(0.3) as scope:
            await mine.recv()
        assert scope.cancelled_caught  # the child is gone, but this process holds its end
        theirs.close()
        with anyio.fail_after(30), pytest.raises(EOFError):
            await mine.recv()


# -- large messages --


async def test_64_mb_each_way_leave_the_loop_running_while_they_travel() -> None:
    """The loop keeps running while a 64 MB message goes to a child and comes back: the heartbeat
    ticks during the receive (the reader thread finishes a large message, not the loop). That no
    call here blocks the loop is checked on asyncio and uvloop by the blocking-call guard;
    how long the loop's longest pause lasts depends on the machine, so it is not asserted."""
    ctx = multiprocessing.get_context("forkserver")
    mine, theirs = aioipc.Pipe(ctx=ctx)
    process = start(ctx, echo_sync, theirs, mine)
    theirs.close()
    message = os.urandom(64 * MB)
    async with mine:
        await mine.send_bytes(message)
        async with heartbeat() as gaps:
            echoed = await mine.recv_bytes()
        assert echoed == message
        assert len(gaps) >= 1  # a tick came while the echo arrived
    await join(process)
