"""aioipc.Process and aioipc.open_process: awaiting worker processes and bounding their lives."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any

import anyio
import pytest
from _helpers import fds_back_to, open_fds, wait_until_set

import aioipc

pytestmark = pytest.mark.anyio

FORK = multiprocessing.get_context("fork")


# -- targets (module level, so that spawn and forkserver children can import them) --


def exit_with(code: int, delay: float = 0.0) -> None:
    time.sleep(delay)
    sys.exit(code)


def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def ignore_sigterm_and_sleep(ready: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(60)


def raise_value_error() -> None:
    raise ValueError("bad input")


def echo_until_eof(conn: aioipc.Connection[Any, Any], inherited_fd: int = -1) -> None:
    if inherited_fd >= 0:  # under fork: this process's copy of the parent's end
        os.close(inherited_fd)
    with conn.sync as sync:
        sync.send("ready")
        while True:
            try:
                sync.send(sync.recv())
            except EOFError:
                return


def send_and_exit(conn: aioipc.Connection[Any, Any]) -> None:
    conn.sync.send("hello")
    conn.sync.close()


def close_all(ends: list[aioipc.Connection[Any, Any]]) -> None:
    for end in ends:
        end.close()
    if not all(end.closed for end in ends):
        sys.exit(1)


def put_pid(q: aioipc.Queue[int]) -> None:
    q.sync.put(os.getpid())


def start_new_event_loops() -> None:
    import trio

    trio.run(trio.sleep, 0)
    asyncio.run(asyncio.sleep(0))
    anyio.run(anyio.sleep, 0)


# -- helpers --


def started(target: Any, *args: Any, ctx: Any = None) -> aioipc.Process:
    process = aioipc.Process(target=target, args=args, ctx=ctx)
    process.start()
    return process


# -- Process.wait --


async def test_wait_returns_the_exit_code(ctx: Any) -> None:
    process = started(exit_with, 3, 0.1, ctx=ctx)
    sentinel = process.sentinel
    assert await process.wait() == 3
    # uvloop makes a watched fd non-blocking; the fork server's exit status is read from it.
    assert os.get_blocking(sentinel)
    assert process.exitcode == 3
    process.close()


async def test_wait_returns_minus_the_signal_of_a_killed_process() -> None:
    process = started(sleep_for, 60, ctx=FORK)
    process.kill()
    assert await process.wait() == -signal.SIGKILL
    process.close()


async def test_wait_on_a_process_that_has_exited_returns_its_code() -> None:
    process = started(exit_with, 4, ctx=FORK)
    process.join()
    assert await process.wait() == 4
    process.close()


async def test_waiting_for_many_processes_starts_no_thread() -> None:
    processes = [started(exit_with, i, 0.3, ctx=FORK) for i in range(8)]
    threads = threading.active_count()
    seen = []

    async def wait_for(process: aioipc.Process) -> None:
        seen.append(await process.wait())

    async with anyio.create_task_group() as tg:
        for process in processes:
            tg.start_soon(wait_for, process)
        await anyio.sleep(0.1)
        assert threading.active_count() == threads
    assert sorted(seen) == list(range(8))
    for process in processes:
        process.close()


async def test_several_tasks_can_wait_for_one_process() -> None:
    process = started(exit_with, 5, 0.2, ctx=FORK)
    codes = []

    async def wait() -> None:
        codes.append(await process.wait())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(wait)
    assert codes == [5, 5, 5]
    process.close()


async def test_a_cancelled_wait_leaves_the_process_running() -> None:
    process = started(exit_with, 6, 0.3, ctx=FORK)
    with anyio.move_on_after(0.05) as scope:
        await process.wait()
    assert scope.cancelled_caught
    assert process.is_alive()
    assert await process.wait() == 6
    process.close()


def test_wait_needs_a_started_process() -> None:
    process = aioipc.Process(target=sleep_for, args=(0,))
    with pytest.raises(ValueError, match="not started"):
        anyio.run(process.wait)


def test_exitcode_survives_close() -> None:
    process = started(exit_with, 8, ctx=FORK)
    process.join()
    process.close()
    assert process.exitcode == 8
    assert repr(process).startswith("<aioipc.Process name='Process-")


async def test_stop_terminates_a_process_that_outlives_the_wait() -> None:
    process = started(sleep_for, 60, ctx=FORK)
    assert await process.stop(0.1) == -signal.SIGTERM
    process.close()


# -- open_process --


async def test_open_process_runs_the_target_and_waits_for_it(ctx: Any) -> None:
    q: aioipc.Queue[int] = aioipc.Queue(ctx=ctx)
    async with aioipc.open_process(put_pid, q, ctx=ctx) as process:
        assert isinstance(process, aioipc.Process)
        assert await q.get() == process.pid
    assert process.exitcode == 0
    with pytest.raises(ValueError, match="closed"):
        process.is_alive()  # closed on exit: its resources are released
    q.close()


async def test_without_ctx_the_process_comes_from_multiprocessing_default_context() -> None:
    q: aioipc.Queue[int] = aioipc.Queue()
    async with aioipc.open_process(put_pid, q) as process:
        assert await q.get() == process.pid
        assert process._start_method is None  # resolved by multiprocessing when it starts
    assert process.exitcode == 0
    q.close()


async def test_a_worker_that_raises_makes_open_process_raise_processfailed(ctx: Any) -> None:
    with pytest.raises(aioipc.ProcessFailed) as info:
        async with aioipc.open_process(raise_value_error, ctx=ctx, name="parser"):
            pass
    assert info.value.exitcode == 1
    assert str(info.value).startswith("parser (pid ")
    assert str(info.value).endswith("exited with code 1")


async def test_open_process_reports_a_killed_worker() -> None:
    with pytest.raises(aioipc.ProcessFailed, match=r"was killed by SIGKILL \(exit code -9\)"):
        async with aioipc.open_process(sleep_for, 60, ctx=FORK) as process:
            process.kill()


async def test_open_process_terminates_a_worker_still_running_after_wait_timeout() -> None:
    with pytest.raises(aioipc.ProcessFailed, match="terminated: it had not exited") as info:
        async with aioipc.open_process(sleep_for, 60, ctx=FORK, wait_timeout=0.1):
            pass
    assert info.value.exitcode == -signal.SIGTERM


async def test_open_process_kills_a_worker_that_ignores_sigterm() -> None:
    ready = FORK.Event()
    with pytest.raises(aioipc.ProcessFailed, match="killed: it had not exited") as info:
        async with aioipc.open_process(
            ignore_sigterm_and_sleep, ready, ctx=FORK, wait_timeout=0.1, terminate_timeout=0.2
        ):
            await wait_until_set(ready)
    assert info.value.exitcode == -signal.SIGKILL


async def test_an_error_in_the_block_terminates_the_worker_at_once() -> None:
    with pytest.raises(RuntimeError, match="consumer bug"):
        async with aioipc.open_process(sleep_for, 60, ctx=FORK) as process:
            raise RuntimeError("consumer bug")
    assert process.exitcode == -signal.SIGTERM  # terminated, not at the end of its sleep


async def test_cancelling_the_block_terminates_the_worker() -> None:
    with anyio.move_on_after(0.2) as scope:
        async with aioipc.open_process(sleep_for, 60, ctx=FORK) as process:
            await anyio.sleep(60)
    assert scope.cancelled_caught
    assert process.exitcode == -signal.SIGTERM


async def test_open_process_leaves_no_file_descriptor_behind(ctx: Any) -> None:
    async with aioipc.open_process(exit_with, 0, ctx=ctx):
        pass  # the first process of a context may start helpers (fork server, resource tracker)
    before = open_fds()
    async with aioipc.open_process(exit_with, 0, ctx=ctx):
        pass
    with pytest.raises(aioipc.ProcessFailed):
        async with aioipc.open_process(exit_with, 2, ctx=ctx):
            pass
    assert await fds_back_to(before) == before


def test_processfailed_survives_a_pickle_round_trip() -> None:
    error = aioipc.ProcessFailed("worker (pid 42) was killed by SIGKILL (exit code -9)", -9)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is aioipc.ProcessFailed
    assert str(copy) == str(error)
    assert copy.exitcode == -9


# -- fork children of a running event loop --


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_fork_child_of_a_running_loop_can_run_new_event_loops() -> None:
    async with aioipc.open_process(start_new_event_loops, ctx=FORK) as process:
        pass
    assert process.exitcode == 0


# -- open_process: every failure reported, connections closed --


async def test_a_worker_that_failed_is_noted_on_the_blocks_own_exception() -> None:
    async def block() -> None:
        async with aioipc.open_process(exit_with, 3, ctx=FORK, name="quitter") as process:
            assert await process.wait() == 3
            raise KeyError("the block's own error")

    with pytest.raises(KeyError) as info:
        await block()
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1
    assert "quitter (pid" in notes[0]
    assert "exited with code 3" in notes[0]


async def test_nested_blocks_report_every_failed_worker() -> None:
    async def blocks() -> None:
        async with aioipc.open_process(exit_with, 1, ctx=FORK, name="outer") as outer:
            await outer.wait()
            async with aioipc.open_process(exit_with, 2, ctx=FORK, name="inner"):
                pass

    with pytest.raises(aioipc.ProcessFailed, match="inner") as info:
        await blocks()
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1
    assert "outer (pid" in notes[0]
    assert "exited with code 1" in notes[0]


async def test_a_worker_terminated_because_the_block_raised_is_not_noted() -> None:
    with pytest.raises(KeyError) as info:
        async with aioipc.open_process(sleep_for, 30, ctx=FORK):
            raise KeyError("stop")
    assert not getattr(info.value, "__notes__", [])


async def test_open_process_closes_the_connection_ends_it_passes(ctx: Any) -> None:
    mine, theirs = aioipc.Pipe(ctx=ctx)
    # Under fork the child holds a copy of `mine` too, and must close it (the fork trap).
    inherited = mine.fileno() if ctx.get_start_method() == "fork" else -1
    async with aioipc.open_process(echo_until_eof, theirs, inherited, ctx=ctx) as process:
        assert theirs.closed
        assert await mine.recv() == "ready"
        await mine.send(1)
        assert await mine.recv() == 1
        mine.close()  # the last copy of this end: the child sees EOF and exits
    assert process.exitcode == 0


async def test_eof_arrives_once_the_child_closes_its_end(ctx: Any) -> None:
    mine, theirs = aioipc.Pipe(ctx=ctx)
    async with mine, aioipc.open_process(send_and_exit, theirs, ctx=ctx):
        received = [message async for message in mine]  # ends at EOF, no manual close
    assert received == ["hello"]


async def test_close_connections_false_keeps_them_open() -> None:
    mine, theirs = aioipc.Pipe(ctx=FORK)
    async with aioipc.open_process(send_and_exit, theirs, ctx=FORK, close_connections=False):
        assert not theirs.closed
    assert await mine.recv() == "hello"
    theirs.close()
    with pytest.raises(EOFError):
        await mine.recv()
    mine.close()


async def test_an_end_closed_here_reaches_the_child_closed(ctx: Any) -> None:
    a, b = aioipc.Pipe(ctx=ctx)
    async with aioipc.open_process(send_and_exit, b, ctx=ctx):  # closes b here once started
        pass
    async with aioipc.open_process(close_all, [a, b], ctx=ctx) as process:
        pass
    assert process.exitcode == 0
    a.close()
