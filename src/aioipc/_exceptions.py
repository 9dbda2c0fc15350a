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
    "BusyResourceError",
    "ClosedResourceError",
    "Empty",
    "Full",
    "ProcessFailed",
    "RemoteError",
    "RemoteTraceback",
    "ShutDown",
    "WorkerDied",
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


class BusyResourceError(anyio.BusyResourceError):
    """Raised when a coroutine receives from a connection end while coroutines of another thread's
    event loop are receiving from it: one end is read on one event loop at a time (several tasks
    of that loop take turns). Sending has no such limit.

    It is an :class:`anyio.BusyResourceError`; its message is kept as given.
    """

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)


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


class WorkerDied(BrokenResourceError):
    """Raised when the pool worker that was running a job died before the job finished: it was
    killed (``SIGKILL``, the OOM killer, a crash) or exited (``os._exit``, ``sys.exit``).

    Only the job the worker was running fails with it; the pool starts a replacement. ``name``,
    ``pid`` and ``exitcode`` (``-N`` for signal ``N``, None if unknown) say which worker and how;
    the message says it too. It is an :class:`aioipc.BrokenResourceError`.
    """

    def __init__(self, message: str, name: str, pid: int | None, exitcode: int | None) -> None:
        super().__init__(message, name, pid, exitcode)

    @property
    def name(self) -> str:
        """The name of the worker process."""
        return str(self.args[1])

    @property
    def pid(self) -> int | None:
        """The process id of the worker."""
        pid: int | None = self.args[2]
        return pid

    @property
    def exitcode(self) -> int | None:
        """The exit code of the worker (``-N`` if signal ``N`` killed it; None if unknown)."""
        code: int | None = self.args[3]
        return code

    def __str__(self) -> str:
        return str(self.args[0])


class RemoteTraceback(Exception):
    """Raised nowhere by itself: it is the ``__cause__`` of a job's exception re-raised by
    ``Pool.run``, and its message is the traceback of the exception in the worker process, so the
    worker's side of the story shows in the caller's traceback.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)

    @property
    def text(self) -> str:
        """The traceback text, as the worker formatted it."""
        return str(self.args[0])

    def __str__(self) -> str:
        return str(self.args[0])


class RemoteError(Exception):
    """Raised by ``Pool.run`` in place of what a job produced when it cannot travel back as itself:
    its exception or its result could not be pickled in the worker, or not be unpickled here.

    The message names the type and the text of the original; the worker's traceback, when there is
    one, is its ``__cause__`` (a :class:`aioipc.RemoteTraceback`).
    """


for _cls in (
    Empty,
    Full,
    ShutDown,
    ClosedResourceError,
    BrokenResourceError,
    BusyResourceError,
    ProcessFailed,
    WorkerDied,
    RemoteTraceback,
    RemoteError,
):
    _cls.__module__ = "aioipc"
del _cls
