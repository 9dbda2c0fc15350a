"""The thread model: how many threads aioipc uses, whose, and that none of them blocks others."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import anyio
import anyio.to_thread
import pytest

import aioipc

pytestmark = pytest.mark.anyio


async def wait_for_getters(queue: aioipc.Queue[int], n: int) -> None:
    with anyio.fail_after(30):
        while queue.statistics().waiting_getters < n:
            await anyio.sleep(0.01)


def aioipc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("aioipc-")]


@pytest.mark.timeout(120)
async def test_ten_thousand_pending_gets_add_at_most_two_threads() -> None:
    async with aioipc.Queue[int]() as queue:
        assert aioipc_threads() == []
        received: list[int] = []

        async def getter() -> None:
            received.append(await queue.get())

        async with anyio.create_task_group() as tg:
            for _ in range(10_000):
                tg.start_soon(getter)
            await wait_for_getters(queue, 10_000)
            # One waits on the loop, the others behind it; past one slice, in the reader thread.
            assert set(aioipc_threads()) <= {"aioipc-reader-queue"}
            for i in range(10_000):
                await queue.put(i)
        assert sorted(received) == list(range(10_000))
        # The reader, and the feeder thread if a put found the pipe full.
        assert set(aioipc_threads()) <= {"aioipc-reader-queue", "aioipc-queue-feeder"}


async def test_pending_gets_leave_anyio_worker_threads_free() -> None:
    async with aioipc.Queue[int]() as queue:
        limiter = anyio.to_thread.current_default_thread_limiter()
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(queue.get)
            await wait_for_getters(queue, 100)
            assert limiter.borrowed_tokens == 0
            with anyio.fail_after(5):
                assert await anyio.to_thread.run_sync(lambda: "ran") == "ran"
            for i in range(100):
                await queue.put(i)


async def test_aioipc_threads_are_named_daemons() -> None:
    async with aioipc.Queue[int](1) as queue:
        await queue.put(0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.put, 1)  # waits for room: the writer thread
            with anyio.fail_after(5):
                while queue.statistics().waiting_putters < 1:
                    await anyio.sleep(0.001)
            assert await queue.get() == 0
            getting = anyio.Event()

            async def get_later() -> None:
                getting.set()
                assert await queue.get() == 1

            await queue.get()  # empties the queue: the next get waits
            tg.start_soon(get_later)
            await getting.wait()
            with anyio.fail_after(5):  # a get that waits past one slice: the reader thread
                while not any(t.name == "aioipc-reader-queue" for t in threading.enumerate()):
                    await anyio.sleep(0.01)
            await queue.put(1)
        threads = [t for t in threading.enumerate() if t.name.startswith("aioipc-")]
        assert {t.name for t in threads} >= {"aioipc-reader-queue", "aioipc-writer-queue"}
        assert all(t.daemon for t in threads)


async def test_close_stops_the_threads_of_this_queue() -> None:
    queue: aioipc.Queue[int] = aioipc.Queue()
    async with anyio.create_task_group() as tg:
        tg.start_soon(queue.get)  # waits past one slice: the reader thread waits for it
        while queue.statistics().threads < 1:
            await anyio.sleep(0.001)
        await queue.put(1)
    assert queue.statistics().threads == 1
    queue.close()
    assert queue.statistics().threads == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_the_interpreter_exits_while_a_reader_thread_is_blocked(loop: str) -> None:
    script = textwrap.dedent(
        f"""
        import anyio, aioipc, warnings
        warnings.simplefilter("ignore", ResourceWarning)
        queue = aioipc.Queue()

        async def main():
            with anyio.move_on_after(0.2):
                await queue.get()  # leaves the reader thread blocked on the empty queue
            print("leaving", queue.statistics().threads)

        anyio.run(main, backend={loop!r})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "leaving 1"
