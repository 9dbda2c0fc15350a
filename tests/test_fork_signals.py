"""Children forked from inside a running event loop get Python's default signal handling back.

The parent's loop installs its own SIGINT handler (asyncio's runner, uvloop through it, trio's
KeyboardInterrupt manager). In a forked child that handler would only poke a loop that does not run
there, and one Ctrl-C would not interrupt the child. Each test runs its own loop (not the test
runner's), so that the loop installs its handlers as it does in an application.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import anyio
import pytest

import aioipc  # noqa: F401  (installs the clean slate for forked children)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork"),
]

LOOPS: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform != "win32":
    import uvloop

    LOOPS.insert(1, pytest.param(("asyncio", {"loop_factory": uvloop.new_event_loop}), id="uvloop"))


def run_in_own_loop(loop: tuple[str, dict[str, Any]], main: Callable[[], Awaitable[None]]) -> None:
    backend, options = loop
    anyio.run(main, backend=backend, backend_options=options)


def wait_for_sigint(conn: Connection[Any, Any]) -> None:
    """In the child: say it is ready, then wait (at most 20 s) for a SIGINT to interrupt it.

    The parent may signal as soon as "ready" is written, before ``send`` has returned here: the
    interrupt is caught from the moment the message is sent.
    """
    try:
        conn.send(("ready", repr(signal.getsignal(signal.SIGINT))))
        time.sleep(20)
    except KeyboardInterrupt:
        conn.send(("interrupted", "KeyboardInterrupt"))
        raise
    conn.send(("interrupted", "no"))


async def fork_and_interrupt() -> tuple[str, int | None]:
    """Fork a child from this running loop, send it one SIGINT; what it reported, its exit code."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=wait_for_sigint, args=(writer,))
    process.start()
    writer.close()
    try:
        assert await anyio.to_thread.run_sync(reader.poll, 20)
        assert reader.recv()[0] == "ready"  # its clean slate ran before this
        os.kill(process.pid, signal.SIGINT)  # type: ignore[arg-type]
        assert await anyio.to_thread.run_sync(reader.poll, 30)
        report = reader.recv()[1]
    finally:
        await anyio.to_thread.run_sync(process.join, 30)
        if process.exitcode is None:
            process.kill()
            process.join()
        reader.close()
    return report, process.exitcode


@pytest.mark.parametrize("loop", LOOPS)
def test_one_sigint_interrupts_a_child_forked_inside_a_running_loop(
    loop: tuple[str, dict[str, Any]],
) -> None:
    outcome: list[tuple[str, int | None]] = []

    async def main() -> None:
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # the loop's own
        outcome.append(await fork_and_interrupt())

    # Start as an application does, with Python's SIGINT handler (a test runner started in the
    # background of a shell inherits SIGINT ignored, and a loop leaves an ignored SIGINT alone).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_in_own_loop(loop, main)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outcome == [("KeyboardInterrupt", 1)]


def report_sigint_handler(conn: Connection[Any, Any]) -> None:
    conn.send(signal.getsignal(signal.SIGINT) is custom_handler)


def custom_handler(signum: int, frame: Any) -> None:
    """An application's own SIGINT handler."""


@pytest.mark.parametrize("loop", LOOPS)
def test_a_sigint_handler_the_application_installed_is_kept_in_the_child(
    loop: tuple[str, dict[str, Any]],
) -> None:
    outcome: list[bool] = []

    async def main() -> None:
        ctx = multiprocessing.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(target=report_sigint_handler, args=(writer,))
        process.start()
        writer.close()
        assert await anyio.to_thread.run_sync(reader.poll, 20)
        outcome.append(reader.recv())
        await anyio.to_thread.run_sync(process.join, 30)
        reader.close()

    previous = signal.signal(signal.SIGINT, custom_handler)
    try:
        run_in_own_loop(loop, main)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outcome == [True]
