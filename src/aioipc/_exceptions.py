"""Every exception aioipc raises of its own.

Each one names a state, keeps its message in ``args`` (so it survives a pickle round trip into
another process unchanged) and, where the standard library already has a family for it, belongs to
that family too, so code written against :mod:`queue`, :mod:`asyncio` or :mod:`anyio` keeps working.
"""

from __future__ import annotations

import asyncio
import queue
import sys

import anyio

__all__ = [
    "BrokenResourceError",
    "ClosedResourceError",
    "Empty",
    "Full",
    "ProcessFailed",
    "ShutDown",
]

_shutdown_bases: tuple[type[Exception], ...]
if sys.version_info >= (3, 13):
    _shutdown_bases = (queue.ShutDown, asyncio.QueueShutDown)
else:
    _shutdown_bases = (Exception,)


class Empty(queue.Empty, asyncio.QueueEmpty):
    """Raised by ``get_nowait()`` when no item is available without waiting.

    It is both a :class:`queue.Empty` and an :class:`asyncio.QueueEmpty`.
    """


class Full(queue.Full, asyncio.QueueFull):
    """Raised by ``put_nowait()`` when a bounded queue has no room for the item.

    It is both a :class:`queue.Full` and an :class:`asyncio.QueueFull`.
    """


class ShutDown(*_shutdown_bases):  # type: ignore[misc]
    """Raised when putting into a queue that was shut down (in any process), or getting from one
    that was shut down and has no items left.

    On Python 3.13 and later it is also a :class:`queue.ShutDown` and an
    :class:`asyncio.QueueShutDown`.
    """


class ClosedResourceError(anyio.ClosedResourceError):
    """Raised when using an object that *this* process closed with ``close()`` or ``aclose()``.

    Coroutines that were waiting on the object when it was closed are woken with it too. It is an
    :class:`anyio.ClosedResourceError`.
    """


class BrokenResourceError(anyio.BrokenResourceError):
    """Raised when the *other side* of a channel is gone: every process linked as its producer has
    exited, or the peer of a connection died, so the awaited item can never arrive.

    It is an :class:`anyio.BrokenResourceError`.
    """


class ProcessFailed(Exception):
    """Raised when a worker process run by ``aioipc.open_process`` exited with a non-zero exit code:
    its target raised, it called ``sys.exit(n)``, or a signal killed it.

    ``exitcode`` is the exit code (``-N`` for signal ``N``); the message names the process.
    """

    def __init__(self, message: str, exitcode: int) -> None:
        super().__init__(message, exitcode)

    @property
    def exitcode(self) -> int:
        """The exit code of the process (``-N`` if signal ``N`` killed it)."""
        return int(self.args[1])

    def __str__(self) -> str:
        return str(self.args[0])


for _cls in (Empty, Full, ShutDown, ClosedResourceError, BrokenResourceError, ProcessFailed):
    _cls.__module__ = "aioipc"
del _cls
