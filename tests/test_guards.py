"""The suite's own guards: uvloop in debug mode, and no blocking call on the event loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
from pathlib import Path

import anyio
import pytest
from blockbuster import BlockingError, blockbuster_ctx
from conftest import BACKENDS, GUARDED_CODE, allow_bounded_blocking

import aioipc

pytestmark = pytest.mark.anyio

#: The backends the guard watches (blockbuster sees asyncio's running loop, uvloop's too).
ASYNCIO_BACKENDS = [param for param in BACKENDS if param.id != "trio"]


def test_every_asyncio_backend_is_guarded() -> None:
    assert [param.id for param in ASYNCIO_BACKENDS] == (
        ["asyncio"] if sys.platform == "win32" else ["asyncio", "uvloop"]
    )


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
async def test_the_loop_runs_in_debug_mode() -> None:
    assert asyncio.get_running_loop().get_debug()


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
async def test_a_blocking_call_on_the_loop_raises() -> None:
    with pytest.raises(BlockingError, match=r"time\.sleep"):
        time.sleep(0)  # noqa: ASYNC251 (what the guard is for)


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
async def test_a_blocking_call_in_a_worker_thread_is_allowed() -> None:
    await anyio.to_thread.run_sync(time.sleep, 0)


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
@pytest.mark.blocks_on_the_loop
async def test_a_test_marked_blocks_on_the_loop_is_not_guarded() -> None:
    time.sleep(0)  # noqa: ASYNC251 (allowed by the marker)


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
@pytest.mark.blocks_on_the_loop
async def test_the_guard_catches_what_the_allowed_calls_do_outside_their_functions() -> None:
    """The allowances are narrow: the same call made elsewhere still fails."""
    with blockbuster_ctx(GUARDED_CODE) as guard:
        allow_bounded_blocking(guard)
        with pytest.raises(BlockingError, match=r"os\.listdir"):
            os.listdir("/proc/self/fd")  # allowed in tests/_helpers.py's open_fds() only


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
async def test_starting_a_process_under_spawn_or_forkserver_is_allowed(method: str) -> None:
    async with aioipc.open_process(int, ctx=multiprocessing.get_context(method)) as process:
        with anyio.fail_after(30):
            assert await process.wait() == 0


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
async def test_a_cancelled_get_wakes_the_reader_thread_without_blocking_the_loop() -> None:
    async with aioipc.Queue[int]() as queue:
        for _ in range(3):  # each cancelled get writes to the reader's wake pipe
            with anyio.move_on_after(0.01):
                await queue.get()
        queue.sync.put(1)
        with anyio.fail_after(5):
            assert await queue.get() == 1


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
async def test_closing_a_queue_with_a_waiting_getter_is_allowed() -> None:
    queue: aioipc.Queue[int] = aioipc.Queue()
    async with anyio.create_task_group() as tg:

        async def get() -> None:
            with pytest.raises(aioipc.ClosedResourceError):
                await queue.get()

        tg.start_soon(get)
        with anyio.fail_after(5):
            while queue.statistics().waiting_getters < 1:
                await anyio.sleep(0.001)
        queue.close()  # wakes the reader thread, and waits for it (bounded)


def test_a_test_that_blocks_on_the_loop_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers = blocks_on_the_loop: blocks on purpose\n")
    pytester.makepyfile(
        """
        import time

        import pytest

        pytestmark = pytest.mark.anyio


        async def test_sleeps_on_the_loop():
            time.sleep(0)


        @pytest.mark.blocks_on_the_loop
        async def test_sleeps_on_the_loop_on_purpose():
            time.sleep(0)
        """
    )
    result = pytester.runpytest_subprocess("-q")
    result.stdout.fnmatch_lines(["*BlockingError: Blocking call to time.sleep*"])
    # asyncio and uvloop fail; trio, which the guard does not watch, and the marked test pass
    result.assert_outcomes(failed=len(ASYNCIO_BACKENDS), passed=len(BACKENDS) * 2 - 2)
