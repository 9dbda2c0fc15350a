"""``aioipc.Queue`` and ``aioipc.JoinableQueue``: the async face of a cross-process queue."""

from __future__ import annotations

import os
import queue as stdlib_queue
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing import context
from multiprocessing.managers import BaseProxy
from multiprocessing.process import BaseProcess
from typing import Any, Generic, Protocol, TypeVar, cast

from ._bridge import AsyncResource, Checkpointer, Job, Reader, Writer
from ._exceptions import Empty, Full, ShutDown
from ._mpqueue import POLL_SLICE, SHUTDOWN_MARKER, SyncQueue, UnpicklingFailed, dumps
from ._process import link_producers

T = TypeVar("T")

#: Items a process may take from the shared queue ahead of its waiting coroutines.
DEFAULT_PREFETCH = 64


class SyncQueueLike(Protocol[T]):
    """What ``Queue.sync`` offers: the blocking interface of :class:`multiprocessing.Queue`."""

    def put(self, obj: T, block: bool = True, timeout: float | None = None) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> T: ...
    def put_nowait(self, obj: T) -> None: ...
    def get_nowait(self) -> T: ...
    def qsize(self) -> int: ...
    def empty(self) -> bool: ...
    def full(self) -> bool: ...


@dataclass(frozen=True)
class QueueStatistics:
    """A snapshot of one queue, as seen from the calling process (``Queue.statistics()``)."""

    #: Coroutines of this process waiting in ``get()``/``get_batch()``.
    waiting_getters: int
    #: Coroutines of this process waiting in ``put()`` for room.
    waiting_putters: int
    #: Items this process took from the shared queue and has not handed out yet (prefetch).
    buffered: int
    #: Items in the queue, as :meth:`Queue.qsize` counts them.
    qsize: int
    #: aioipc threads of this queue running in this process.
    threads: int


class _Foreign:
    """An existing multiprocessing queue or manager proxy, adopted by :meth:`Queue.wrap`."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.maxsize: int = getattr(obj, "_maxsize", None) or getattr(obj, "maxsize", 0) or 0
        if self.maxsize >= 2**31 - 1:  # multiprocessing's "unbounded"
            self.maxsize = 0
        self.is_proxy = isinstance(obj, BaseProxy)
        self.is_shutdown = False

    def read(
        self, max_items: int, max_bytes: int, wake_fd: int
    ) -> tuple[list[Any], BaseException | None]:
        try:
            items = [self.obj.get(True, POLL_SLICE)]
        except stdlib_queue.Empty:
            return [], None
        while len(items) < max_items:
            try:
                items.append(self.obj.get_nowait())
            except stdlib_queue.Empty:
                break
        if any(item is SHUTDOWN_MARKER for item in items):
            self.is_shutdown = True
            self.obj.put(SHUTDOWN_MARKER)  # for the next process
            return [item for item in items if item is not SHUTDOWN_MARKER], ShutDown()
        return items, None

    def giveback(self, items: list[Any]) -> None:
        for item in items:
            self.obj.put(item)

    def put_nowait(self, item: Any) -> None:
        if self.is_shutdown:
            raise ShutDown
        dumps(item)  # raise here, not later in a feeder thread
        try:
            self.obj.put_nowait(item)
        except stdlib_queue.Full:
            raise Full from None

    def put_waiting(self, item: Any, job: Job[None]) -> None:
        while not job.abandoned:
            if self.is_shutdown:
                raise ShutDown
            try:
                self.obj.put(item, True, POLL_SLICE)
            except stdlib_queue.Full:
                continue
            job.commit()
            return

    def qsize(self) -> int:
        return int(self.obj.qsize())

    def shutdown(self, immediate: bool) -> None:
        if immediate:
            while True:
                try:
                    self.obj.get_nowait()
                except stdlib_queue.Empty:
                    break
        if not self.is_shutdown:
            self.is_shutdown = True
            self.obj.put(SHUTDOWN_MARKER)

    def task_done(self) -> None:
        self.obj.task_done()

    def join_waiting(self, job: Job[None]) -> None:
        self.obj.join()

    def close(self) -> None:
        pass


class Queue(AsyncResource, Generic[T]):
    """A queue shared by processes, with an async face for coroutines and a blocking one (``sync``)
    for synchronous code.

    Build it in synchronous code before starting the processes that use it, and pass it to them as
    an argument (it pickles for spawn and forkserver, and is inherited under fork). Every process
    may put and get, synchronously through :attr:`sync` or asynchronously with its own event loop.

    ``maxsize`` bounds the queue (0: unbounded). ``ctx`` is the multiprocessing context whose locks
    it uses (default: multiprocessing's default context). ``prefetch`` is how many items this
    process's reader thread may take ahead of the coroutines waiting for them; ``prefetch=0`` takes
    only what waiters ask for, for strict fairness between consumer processes.
    """

    _joinable = False

    def __init__(
        self, maxsize: int = 0, *, ctx: Any = None, prefetch: int = DEFAULT_PREFETCH
    ) -> None:
        self._setup(SyncQueue(maxsize, ctx=ctx, joinable=self._joinable), prefetch, owner=True)

    @classmethod
    def wrap(cls, obj: Any, *, prefetch: int = DEFAULT_PREFETCH) -> Queue[Any]:
        """Adopt an existing queue: a :class:`multiprocessing.Queue` or ``JoinableQueue``, a
        manager's queue proxy, or the :attr:`sync` face of another aioipc queue.

        The wrapped queue keeps working for its other users. Differences from a queue built by
        aioipc: ``shutdown()`` reaches other processes through a marker item (aioipc readers
        recognise it; plain ``get()`` callers receive it), ``qsize()`` is the wrapped object's own,
        and a cancelled ``join()`` leaves a thread waiting until the queue is joined.
        """
        if isinstance(obj, Queue):
            raise TypeError("this is an aioipc queue already; use it as it is")
        if cls._joinable and not hasattr(obj, "task_done"):
            raise TypeError(f"{type(obj).__name__} has no task_done(): it is not a joinable queue")
        if not all(hasattr(obj, name) for name in ("get", "put", "get_nowait", "put_nowait")):
            raise TypeError(f"cannot wrap {type(obj).__name__}: it is not a queue")
        self = cls.__new__(cls)
        channel = obj if isinstance(obj, SyncQueue) else _Foreign(obj)
        self._setup(channel, prefetch, owner=False)
        return self

    def _setup(self, channel: Any, prefetch: int, *, owner: bool) -> None:
        self._channel = channel
        self._prefetch = prefetch
        self._reader: Reader[T] = Reader(channel, name="queue", prefetch=prefetch)
        self._writer = Writer("queue")
        self._joiner = Writer("join")
        self._checkpoints = Checkpointer()
        #: Our own bounded queues free a slot when a get hands an item out, not when prefetched.
        self._bounded = isinstance(channel, SyncQueue) and channel.maxsize > 0
        self._closed = False
        #: The process that built this queue warns if it is left unclosed.
        self._owner_pid = os.getpid() if owner else -1
        #: A queue made by ``wrap`` leaves the wrapped object open when it closes.
        self._owns_channel = not isinstance(channel, _Foreign) and owner

    def __getstate__(self) -> tuple[Any, int]:
        context.assert_spawning(self)
        return (
            self._channel if isinstance(self._channel, SyncQueue) else self._channel.obj,
            self._prefetch,
        )

    def __setstate__(self, state: tuple[Any, int]) -> None:
        channel, prefetch = state
        if isinstance(channel, SyncQueue):
            self._setup(channel, prefetch, owner=False)
            self._owns_channel = True  # this process's own copy
        else:
            self._setup(_Foreign(channel), prefetch, owner=False)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"qsize={self.qsize()}"
        return f"<aioipc.{type(self).__name__} maxsize={self.maxsize} {state} at {id(self):#x}>"

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._owner_pid == os.getpid():
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)

    # -- properties --

    @property
    def sync(self) -> SyncQueueLike[T]:
        """The blocking face of this queue, for synchronous code (a :class:`SyncQueue`, or the
        object given to :meth:`wrap`). Items this process prefetched are not visible there."""
        channel = self._channel
        return channel if isinstance(channel, SyncQueue) else channel.obj

    @property
    def maxsize(self) -> int:
        """The capacity; 0 means unbounded."""
        return int(self._channel.maxsize)

    # -- putting --

    async def put(self, item: T) -> None:
        """Put ``item`` into the queue, waiting for room if it is bounded and full.

        The item is pickled here, so an object that cannot be pickled raises ``TypeError`` at this
        call and the queue stays usable. Raises :class:`aioipc.ShutDown` after ``shutdown()`` and
        :class:`aioipc.ClosedResourceError` after ``close()``.

        **Cancellation**: if cancelled while waiting for room, the item was not put. Once room is
        found the item goes in at once; the item is never put twice.
        """
        if self._checkpoints.due():
            await self._checkpoints.checkpoint()
        self._check_open()
        channel = self._channel
        if isinstance(channel, SyncQueue):
            data = dumps(item)
            if not self._writer.busy and channel.try_room():
                channel.feed(data)
                return
            await self._writer.run(lambda job: self._put_waiting(channel, data, job))
        elif channel.is_proxy or self._writer.busy:
            dumps(item)
            await self._writer.run(lambda job: channel.put_waiting(item, job))
        else:
            try:
                channel.put_nowait(item)
            except Full:
                await self._writer.run(lambda job: channel.put_waiting(item, job))

    @staticmethod
    def _put_waiting(channel: SyncQueue[T], data: memoryview, job: Job[None]) -> None:
        while not job.abandoned:
            if channel.is_shutdown:
                raise ShutDown
            if channel._acquire_room(True, POLL_SLICE):
                if not job.commit():
                    channel.release_room()
                    return
                channel.feed(data)
                return

    def put_nowait(self, item: T) -> None:
        """Put ``item`` if there is room now; else raise :class:`aioipc.Full`.

        Pickles in the caller (``TypeError`` for an unpicklable item); never blocks.
        """
        self._check_open()
        self._channel.put_nowait(item)

    # -- getting --

    async def get(self) -> T:
        """Remove and return the next item, waiting for one.

        Raises :class:`aioipc.ShutDown` once the queue is shut down and drained,
        :class:`aioipc.ClosedResourceError` after ``close()``, and the unpickling error of an item
        that cannot be rebuilt in this process (the queue goes on).

        **Cancellation**: a cancelled or timed-out ``get()`` loses nothing. An item taken for it
        goes back to this process's buffer, ahead of newer items, for the next ``get()``.
        """
        if self._checkpoints.due():
            await self._checkpoints.checkpoint()
        try:
            item = self._reader.take_nowait()
        except IndexError:
            self._check_open()
            item = (await self._reader.take(1))[0]
        if self._bounded:
            self._channel.release_room()
        if type(item) is UnpicklingFailed:
            raise cast(UnpicklingFailed, item).error
        return item

    async def get_batch(self, max_items: int) -> list[T]:
        """Wait for at least one item, and return it with those already available, up to
        ``max_items`` in all.

        **Cancellation**: as :meth:`get`; the items taken for a cancelled call go back, in order.
        """
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be an int >= 1, not {max_items!r}")
        await self._checkpoints.tick()
        self._check_open()
        items = await self._reader.take(max_items)
        for i, item in enumerate(items):
            if isinstance(item, UnpicklingFailed):
                # Hand out the good items before it; or raise it, and keep the rest for later.
                handed = i or 1
                self._reader.buffer.extendleft(reversed(items[handed:]))
                self._handed_out(handed)
                if i:
                    return items[:i]
                raise item.error
        self._handed_out(len(items))
        return items

    def get_nowait(self) -> T:
        """Return an item already in this process or the shared queue, or raise
        :class:`aioipc.Empty`.

        It does not wait for the reader thread, so an item put a moment ago by another process
        (or by this one) may not be visible yet, as with :class:`multiprocessing.Queue`.
        """
        try:
            item = self._reader.take_nowait()
        except IndexError:
            self._check_open()
            if self._channel.is_shutdown and self._channel.qsize() <= 0:
                raise ShutDown from None
            raise Empty from None
        self._handed_out(1)
        if isinstance(item, UnpicklingFailed):
            raise item.error
        return item

    def _handed_out(self, n: int) -> None:
        """Items left this process's buffer for good: free their slots of a bounded queue."""
        if self._bounded:
            self._channel.release_room(n)

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.get()
        except ShutDown:
            raise StopAsyncIteration from None

    # -- size --

    def qsize(self) -> int:
        """Items put and not yet handed out by a ``get`` (approximate while others use the queue).

        Items other processes prefetched are not counted. Works on every platform, macOS too.
        """
        return self._channel.qsize() + len(self._reader.buffer)  # type: ignore[no-any-return]

    def empty(self) -> bool:
        """True if :meth:`qsize` is 0."""
        return self.qsize() == 0

    def full(self) -> bool:
        """True if the queue is bounded and has no room."""
        return bool(self.maxsize) and self.qsize() >= self.maxsize

    # -- shutdown --

    def shutdown(self, immediate: bool = False) -> None:
        """Shut the queue down, for every process that uses it.

        ``put`` then raises :class:`aioipc.ShutDown` everywhere; ``get`` returns the items still
        queued, then raises it, and ``async for`` ends. With ``immediate=True`` the queued items
        are discarded and every waiter wakes at once. Waiters in other processes wake within about
        100 ms (at once, as a rule).
        """
        self._check_open()
        self._channel.shutdown(immediate)
        if immediate:
            self._reader.end(ShutDown(), discard=True)

    def link(self, *producers: BaseProcess) -> None:
        """Supervise the processes that put items into this queue (started by this process).

        Once every linked process has exited, getters in every process receive the items still
        queued, then :class:`aioipc.BrokenResourceError` naming the processes and their exit
        codes, instead of waiting forever. After :meth:`shutdown` they end with ``ShutDown`` as
        usual. A producer killed inside ``put`` in the middle of an item cuts the stream: getters
        of this process then raise ``BrokenResourceError`` at once. Not for queues adopted by
        :meth:`wrap`.
        """
        self._check_open()
        link_producers(self, producers)

    # -- closing --

    def close(self) -> None:
        """Release this process's threads and file descriptors. Idempotent, never blocks for long.

        Waiting coroutines are woken with :class:`aioipc.ClosedResourceError`, later calls raise it.
        Items this process prefetched go back into the queue (at its end): nothing is lost. Other
        processes are not affected. A queue made by :meth:`wrap` leaves the wrapped object open.
        """
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._joiner.close()
        leftover = self._reader.close()
        self._channel.giveback(leftover)
        if self._owns_channel:
            self._channel.close()

    def statistics(self) -> QueueStatistics:
        """A snapshot of this queue as seen from this process."""
        reader, writer = self._reader.statistics(), self._writer.statistics()
        return QueueStatistics(
            waiting_getters=reader["waiting"],
            waiting_putters=writer["waiting"],
            buffered=reader["buffered"],
            qsize=0 if self._closed else self.qsize(),
            threads=reader["threads"] + writer["threads"] + self._joiner.statistics()["threads"],
        )


class JoinableQueue(Queue[T]):
    """A :class:`Queue` that counts unfinished tasks: consumers call :meth:`task_done` for each item
    they have processed, and :meth:`join` waits until every item put has been processed."""

    _joinable = True

    @classmethod
    def wrap(cls, obj: Any, *, prefetch: int = DEFAULT_PREFETCH) -> JoinableQueue[Any]:
        """Adopt an existing joinable queue: a :class:`multiprocessing.JoinableQueue`, a manager's
        queue proxy, or the :attr:`sync` face of another aioipc joinable queue (see
        :meth:`Queue.wrap`)."""
        return cast("JoinableQueue[Any]", super().wrap(obj, prefetch=prefetch))

    def task_done(self) -> None:
        """Mark one item taken earlier as processed. Raises ``ValueError`` if called more times
        than items were put."""
        self._check_open()
        self._channel.task_done()

    async def join(self) -> None:
        """Wait until every item put (by any process) has been taken and marked done with
        :meth:`task_done`, or the queue was shut down and drained.

        **Cancellation**: safe; nothing changes in the queue.
        """
        self._check_open()
        channel = self._channel
        if isinstance(channel, SyncQueue):
            if channel._joined():
                await self._checkpoints.tick()
                return
            await self._joiner.run(lambda job: self._join_waiting(channel, job))
        else:
            await self._joiner.run(channel.join_waiting)

    @staticmethod
    def _join_waiting(channel: SyncQueue[T], job: Job[None]) -> None:
        while not job.abandoned and not channel.join(timeout=POLL_SLICE):
            pass
