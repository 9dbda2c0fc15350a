"""Queues, pipes, listeners and processes work in a process that holds more than 1,024 open
descriptors, so that every descriptor aioipc makes is above 1,024 (where ``select.select()`` fails:
aioipc must wait with ``poll``, ``epoll`` or ``selectors`` only).

Each test runs in a child process of its own (spawn): it raises its descriptor limit, opens 1,100
descriptors, then runs the scenario on the event loop under test and reports the outcome.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import anyio
import pytest

import aioipc

pytestmark = pytest.mark.timeout(60)

HOARD = 1_100
KEY = b"many descriptors"

LOOPS: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]


def hoard_descriptors() -> list[int]:
    """Open descriptors until every new one is above 1,024; the ones opened."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HOARD + 1_000
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    hoard = [os.open(os.devnull, os.O_RDONLY) for _ in range(HOARD)]
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    assert probe > 1024, probe
    return hoard


def run_in_child(
    conn: Connection[Any, Any], loop: tuple[str, dict[str, Any]], scenario: str
) -> None:
    """In the child: hoard descriptors, run the scenario, send back "ok" or the traceback."""
    try:
        hoard = hoard_descriptors()
        backend, options = loop
        main: Callable[[], Awaitable[None]] = SCENARIOS[scenario]
        anyio.run(main, backend=backend, backend_options=options)
        for fd in hoard:
            os.close(fd)
        conn.send("ok")
    except BaseException:
        conn.send(traceback.format_exc())


def check_above_1024(*fds: int) -> None:
    assert min(fds) > 1024, fds


async def queue_scenario() -> None:
    """2 MiB put into an unbounded queue before anyone gets: the feeder thread must wait for room
    in the pipe; then everything arrives, in order."""
    item_size, count = 32 * 1024, 64
    queue: aioipc.Queue[bytes] = aioipc.Queue()
    async with queue:
        with anyio.fail_after(20):
            for i in range(count):
                await queue.put(i.to_bytes(2, "big") * (item_size // 2))
            await anyio.sleep(0.1)  # the feeder thread fills the pipe and waits for room
            for i in range(count):
                assert await queue.get() == i.to_bytes(2, "big") * (item_size // 2)


async def pipe_scenario() -> None:
    """2 MiB sent through a pipe while the other end receives: sends wait for room."""
    receiver, sender = aioipc.Pipe(duplex=False)
    check_above_1024(receiver.fileno(), sender.fileno())
    message = b"m" * (256 * 1024)
    async with receiver, sender:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def send_all() -> None:
                    for i in range(8):
                        await sender.send_bytes(message + bytes([i]))
                    await sender.send("done")

                tg.start_soon(send_all)
                for i in range(8):
                    assert await receiver.recv_bytes() == message + bytes([i])
                assert await receiver.recv() == "done"


async def listener_scenario() -> None:
    """A listener accepts a peer that connects with the key; they exchange messages."""
    async with aioipc.listen(authkey=KEY) as listener:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                accepted: list[aioipc.Connection[Any, Any]] = []

                async def accept() -> None:
                    accepted.append(await listener.accept())

                tg.start_soon(accept)
                client = await aioipc.connect(listener.address, authkey=KEY)
            async with client, accepted[0] as server:
                check_above_1024(client.fileno(), server.fileno())
                await client.send("hello")
                assert await server.recv() == "hello"
                await server.send_bytes(b"x" * 1_000_000)
                assert await client.recv_bytes() == b"x" * 1_000_000


def exit_with(code: int) -> None:
    os._exit(code)


async def process_scenario() -> None:
    """A process's exit is awaited."""
    process = aioipc.Process(target=exit_with, args=(7,))
    process.start()
    with anyio.fail_after(30):
        assert await process.wait() == 7
    process.close()


SCENARIOS: dict[str, Callable[[], Awaitable[None]]] = {
    "queue": queue_scenario,
    "pipe": pipe_scenario,
    "listener": listener_scenario,
    "process": process_scenario,
}


def run_scenario(loop: tuple[str, dict[str, Any]], scenario: str) -> str:
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=run_in_child, args=(writer, loop, scenario))
    process.start()
    writer.close()
    try:
        if not reader.poll(50):
            return "no answer from the child"
        outcome: str = reader.recv()
    finally:
        process.join(10)
        if process.exitcode is None:
            process.kill()
            process.join()
        reader.close()
    return outcome


@pytest.mark.parametrize("loop", LOOPS)
def test_a_queue_delivers_everything_with_descriptors_above_1024(
    loop: tuple[str, dict[str, Any]],
) -> None:
    assert run_scenario(loop, "queue") == "ok"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_pipe_delivers_everything_with_descriptors_above_1024(
    loop: tuple[str, dict[str, Any]],
) -> None:
    assert run_scenario(loop, "pipe") == "ok"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_listener_accepts_and_connects_with_descriptors_above_1024(
    loop: tuple[str, dict[str, Any]],
) -> None:
    assert run_scenario(loop, "listener") == "ok"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_process_exit_is_awaited_with_descriptors_above_1024(
    loop: tuple[str, dict[str, Any]],
) -> None:
    assert run_scenario(loop, "process") == "ok"
