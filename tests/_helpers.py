"""Helpers shared by the tests that start processes."""

from __future__ import annotations

import os
import time
from multiprocessing.process import BaseProcess
from typing import Any

import anyio


def start(ctx: Any, target: Any, *args: Any) -> BaseProcess:
    """Start ``target(*args)`` in a process of the multiprocessing context ``ctx``."""
    process: BaseProcess = ctx.Process(target=target, args=args)
    process.start()
    return process


async def join(process: BaseProcess) -> int | None:
    """Wait (up to 30 s) without blocking the loop for ``process`` to end; its exit code."""
    with anyio.fail_after(30):
        while process.is_alive():
            await anyio.sleep(0.01)
    process.join()
    return process.exitcode


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fds_back_to(expected: int) -> int:
    """The number of open fds, once it has come back to ``expected`` (or after 3 s): threads
    close their descriptors when they stop."""
    deadline = time.monotonic() + 3
    while open_fds() > expected and time.monotonic() < deadline:
        await anyio.sleep(0.02)
    return open_fds()


async def wait_until_set(event: Any) -> None:
    """Wait for a multiprocessing event to be set (within 10 s)."""
    with anyio.fail_after(10):
        while not event.is_set():
            await anyio.sleep(0.01)
