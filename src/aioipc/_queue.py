"""``aioipc.Queue`` and ``aioipc.JoinableQueue``: the async face of a cross-process queue."""

from __future__ import annotations

import asyncio
import copy
import os
import queue as stdlib_queue
import select
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing import context
from multiprocessing.context import BaseContext
from multiprocessing.managers import BaseProxy
from multiprocessing.process import BaseProcess
from typing import Any, Generic, Protocol, TypeVar, cast

from ._bridge import Job, Reader, Writer
from ._exceptions import Empty, Full, ShutDown
from ._loops import Checkpointer, FdWatch, Turns
from ._mpqueue import (
    MAXSIZE_LIMIT,
    NOTHING,
    SHUTDOWN_MARKER,
    EndMarker,
    SyncQueue,
    UnpicklingFailed,
)
from ._resource import AsyncResource
from ._supervision import link_producers
from ._wire import POLL_SLICE, available, dumps

T = TypeVar("T")

#: Items a process may take from the shared queue ahead of its waiting coroutines: none, as with
#: multiprocessing's own queues, so that consumer processes share the work.
DEFAULT_PREFETCH = 0
#: A put waiting for room in a wrapped queue (which cannot tell when room appears) first sleeps
#: this long between looks, doubling up to POLL_SLICE: prompt at first, cheap when it lasts.
_ROOM_FIRST_SLEEP = 0.001
#: The largest ``prefetch`` accepted: a bound on the memory one process may hold.
MAX_PREFETCH = 1 << 20
#: A getter waits for the shared queue's pipe on the event loop itself (a private epoll, see
#: ``Queue._wait_shared``) where the system has epoll; elsewhere the reader thread waits.
_LOOP_WAITS = hasattr(select, "epoll") and hasattr(os, "eventfd")


def _nothing() -> None:
    pass


def _check_prefetch(prefetch: object) -> int:
    if not isinstance(prefetch, int) or isinstance(prefetch, bool):
        raise TypeError(f"prefetch must be an int, not {type(prefetch).__name__}")
    if not 0 <= prefetch <= MAX_PREFETCH:
        raise ValueError(f"prefetch must be between 0 and {MAX_PREFETCH}, not {prefetch}")
    return prefetch


class SyncQueueLike(Protocol[T]):
    """What ``Queue.sync`` offers: the blocking interface of :class:`multiprocessing.Queue`.

    A queue built by aioipc gives a :class:`aioipc.SyncQueue`, which also has ``shutdown()`` and
    ``maxsize``; a wrapped multiprocessing queue has neither, so they are not promised here:
    :meth:`Queue.shutdown` and :attr:`Queue.maxsize` work in any process, with or without a loop.
    """

    def put(self, obj: T, block: bool = True, timeout: float | None = None) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> T: ...
    def put_nowait(self, obj: T) -> None: ...
    def get_nowait(self) -> T: ...
    def qsize(self) -> int: ...
    def empty(self) -> bool: ...
    def full(self) -> bool: ...
    def close(self) -> None: ...
    def join_thread(self) -> None: ...
    def cancel_join_thread(self) -> None: ...


class JoinableSyncQueueLike(SyncQueueLike[T], Protocol[T]):
    """What ``JoinableQueue.sync`` offers: the blocking interface of
    :class:`multiprocessing.JoinableQueue`."""

    def task_done(self) -> None: ...
    def join(self) -> object: ...


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
        if self.maxsize >= MAXSIZE_LIMIT:  # multiprocessing's "unbounded" (SEM_VALUE_MAX)
            self.maxsize = 0
        self.is_proxy = isinstance(obj, BaseProxy)
        self.is_shutdown = False
        self.is_shutdown_immediate = False

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
        return self._unmark(items)

    def take_nowait(self) -> list[Any]:
        """One item if the wrapped queue has one now (``[]`` if not)."""
        try:
            return [self.obj.get_nowait()]
        except stdlib_queue.Empty:
            return []

    def _unmark(self, items: list[Any]) -> tuple[list[Any], BaseException | None]:
        if any(item is SHUTDOWN_MARKER for item in items):
            self.is_shutdown = True
            self._put_marker()  # for the next process
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

    def wait_room(self, job: Job[bool]) -> bool:
        """In the writer thread: wait until the wrapped queue has room (the put itself happens on
        the caller's side, so that a cancelled put never puts)."""
        sleep = _ROOM_FIRST_SLEEP
        while not job.abandoned:
            if self.is_shutdown:
                raise ShutDown
            if not self.obj.full():
                return job.commit()
            time.sleep(sleep)
            sleep = min(sleep * 2, POLL_SLICE)
        return False

    def qsize(self) -> int:
        return int(self.obj.qsize())

    def shutdown(self, immediate: bool) -> None:
        if immediate:
            self.is_shutdown_immediate = True
            while True:
                try:
                    self.obj.get_nowait()
                except stdlib_queue.Empty:
                    break
                if hasattr(self.obj, "task_done"):
                    self.obj.task_done()
        if not self.is_shutdown:
            self.is_shutdown = True
            self._put_marker()

    def _put_marker(self) -> None:
        """Put the shutdown marker; a joinable queue does not count it as an unfinished item, so
        that its ``join()`` returns once the real items are done."""
        self.obj.put(SHUTDOWN_MARKER)
        if hasattr(self.obj, "task_done"):
            self.obj.task_done()

    def discard_taken(self, n: int) -> None:
        if hasattr(self.obj, "task_done"):
            for _ in range(n):
                self.obj.task_done()

    def task_done(self) -> None:
        self.obj.task_done()

    def join_waiting(self, job: Job[None]) -> None:
        self.obj.join()

    def release_room(self, n: int = 1) -> None:
        """Slots of a wrapped queue are freed by its own ``get``."""

    def close(self) -> None:
        pass


class Queue(AsyncResource, Generic[T]):
    """A queue shared by processes, with an async face for coroutines and a blocking one (``sync``)
    for synchronous code.

    Build it in synchronous code before starting the processes that use it, and pass it to them as
    an argument (it pickles for spawn and forkserver, and is inherited under fork). Every process
    may put and get, synchronously through :attr:`sync` or asynchronously with its own event loop.

    ``maxsize`` bounds the queue (0: unbounded). ``ctx`` is the multiprocessing context whose locks
    it uses (default: multiprocessing's default context).

    A process takes an item off the shared queue only for a coroutine of its own that waits for
    one (``get``, ``get_batch``, ``async for``), as :class:`multiprocessing.Queue` does, so that
    consumer processes share the work. ``prefetch`` lets this process's reader take up to that
    many more items while its coroutines wait, for a consumer that wants throughput more than
    fairness; the default is 0.
    """

    _joinable = False

    def __init__(
        self,
        maxsize: int = 0,
        *,
        ctx: BaseContext | None = None,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        _check_prefetch(prefetch)
        self._setup(SyncQueue(maxsize, ctx=ctx, joinable=self._joinable), prefetch, owner=True)

    @classmethod
    def wrap(cls, obj: Any, *, prefetch: int = DEFAULT_PREFETCH) -> Queue[Any]:
        """Adopt an existing queue: a :class:`multiprocessing.Queue` or ``JoinableQueue``, a
        manager's queue proxy, or the :attr:`sync` face of another aioipc queue.

        The wrapped queue keeps working for its other users. Differences from a queue built by
        aioipc: ``shutdown()`` reaches other processes through a marker item (aioipc readers
        recognise it; plain ``get()`` callers receive it), ``qsize()`` is the wrapped object's own,
        ``get_nowait()`` and a ``put()`` that finds room call the wrapped object on the event
        loop's thread (a manager round trip for a proxy), a waiting ``get()`` holds the wrapped
        queue's read lock in this process's reader thread (as its own ``get`` does), and a
        cancelled ``join()`` leaves a thread waiting until the queue is joined.
        """
        _check_prefetch(prefetch)
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

    def _setup(self, channel: SyncQueue[T] | _Foreign, prefetch: int, *, owner: bool) -> None:
        self._channel = channel
        self._prefetch = prefetch
        self._reader: Reader[T] = Reader(
            channel, name="queue", prefetch=prefetch, giveback=channel.giveback
        )
        self._writer = Writer("queue")
        self._joiner = Writer("join")
        self._checkpoints = Checkpointer()
        #: Our own bounded queues free a slot when a get hands an item out, not when prefetched.
        self._bounded = isinstance(channel, SyncQueue) and channel.maxsize > 0
        #: Items can be taken on the loop's thread without waiting (not through a manager).
        self._reads_inline = isinstance(channel, SyncQueue) or not channel.is_proxy
        self._closed = False
        #: The process that built this queue warns if it is left unclosed.
        self._owner_pid = os.getpid() if owner else -1
        #: A queue made by ``wrap`` leaves the wrapped object open when it closes.
        self._owns_channel = not isinstance(channel, _Foreign) and owner
        #: What supervision sees of this queue, once ``link()`` was called.
        self._supervised: _Supervised | None = None
        #: A getter may wait for the pipe on the event loop (one at a time: ``_watching``), with
        #: a private epoll made by the process in ``_watch_pid``.
        self._loop_waits = _LOOP_WAITS and isinstance(channel, SyncQueue)
        self._epoll: Any = None
        self._watch: FdWatch | None = None
        self._watch_pid = 0
        self._watching = False
        #: An eventfd in that epoll, written by ``close()``: it wakes a getter watching the pipe.
        #: It is closed with the epoll, or when the queue is collected.
        self._closing_fd = -1
        self._close_closing_fd: Callable[[], object] = _nothing
        #: The getters of one loop take turns at watching (FIFO); ``_turn_getters`` of them wait.
        self._turns = Turns("the queue is being watched from another thread's event loop")
        self._turn_getters = 0

    def __getstate__(self) -> tuple[Any, int]:
        context.assert_spawning(self)
        channel = self._channel
        return (channel if isinstance(channel, SyncQueue) else channel.obj, self._prefetch)

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

    # -- properties --

    @property
    def sync(self) -> SyncQueueLike[T]:
        """The blocking face of this queue, for synchronous code (a :class:`SyncQueue`, or the
        object given to :meth:`wrap`). Items this process holds for its coroutines (a cancelled
        get's item, prefetch) are not visible there."""
        channel = self._channel
        return channel if isinstance(channel, SyncQueue) else cast(SyncQueueLike[T], channel.obj)

    @property
    def maxsize(self) -> int:
        """The capacity; 0 means unbounded."""
        return self._channel.maxsize

    # -- putting --

    async def put(self, item: T) -> None:
        """Put ``item`` into the queue, waiting for room if it is bounded and full.

        The item is pickled here, so an object that cannot be pickled raises ``TypeError`` at this
        call and the queue stays usable. Raises :class:`aioipc.ShutDown` after ``shutdown()``,
        :class:`aioipc.ClosedResourceError` after ``close()`` (also when it comes while this call
        waits for room: the item was not put), and :class:`aioipc.BrokenResourceError` naming the
        dead process once the queue's stream is cut (also while it waits for room).

        **Cancellation**: a cancellation point, even when there is room. If it raises the
        cancellation, the item was not put; if it returns, the item was put, once. The wait for
        room runs in this queue's writer thread, which only reserves a slot; the item goes in on
        the caller's side, after the caller has resumed.
        """
        step = self._checkpoints.step()
        if step is not None:
            await step
        self._check_open()
        channel = self._channel
        if isinstance(channel, SyncQueue):
            data = dumps(item)
            writer = self._writer
            if writer.busy or not channel.acquire_room(False):
                if not writer.busy:  # one yield first: consumers often free a slot meanwhile
                    await self._checkpoints.checkpoint()
                if writer.busy or not channel.acquire_room(False):
                    await writer.run(
                        lambda job: _reserve_room(channel, job), lambda _: channel.release_room()
                    )
            channel.feed(data)
            return
        if not self._writer.busy:
            try:
                channel.put_nowait(item)
                return
            except Full:
                pass
        else:
            dumps(item)  # raise here, before waiting
        while True:
            await self._writer.run(channel.wait_room)
            try:
                channel.put_nowait(item)
                return
            except Full:  # another producer took the room first: wait again
                continue

    def put_nowait(self, item: T) -> None:
        """Put ``item`` if there is room now; else raise :class:`aioipc.Full`.

        Pickles in the caller (``TypeError`` for an unpicklable item); never blocks.
        """
        self._check_open()
        self._channel.put_nowait(item)

    # -- getting --

    async def get(self) -> T:
        """Remove and return the next item, waiting for one.

        An item that has arrived in the shared queue is taken on the event loop's thread, without
        waiting; otherwise this process's reader thread waits and takes one for this call.
        Raises :class:`aioipc.ShutDown` once the queue is shut down and drained,
        :class:`aioipc.ClosedResourceError` after ``close()``, :class:`aioipc.BrokenResourceError`
        naming the dead process once the stream is cut (a process died in the middle of an item)
        or once linked producers failed, and the unpickling error of an item that cannot be
        rebuilt in this process (the queue goes on).

        **Cancellation**: a cancellation point, even when an item is there. A cancelled or
        timed-out ``get()`` loses nothing: an item the reader took for it stays in this process,
        ahead of newer items, for the next ``get()`` (and goes back into the queue at ``close()``).
        """
        step = self._checkpoints.step()
        if step is not None:
            await step
        reader = self._reader
        if reader.idle and not self._turns.busy:
            item = self._take_shared(owe=False)
            if item is NOTHING and self._loop_waits:
                item = await self._wait_in_turn(tried=True)
        else:
            try:
                item = reader.take_nowait()
            except IndexError:
                item = NOTHING
            if item is NOTHING and self._loop_waits and not self._turns.held_elsewhere():
                item = await self._wait_in_turn(tried=False)
        if item is NOTHING:  # wait, outside any except clause: nothing internal is chained
            item = (await reader.take(1))[0]
        return self._hand_out(item)

    async def _wait_in_turn(self, *, tried: bool) -> Any:
        """Wait for an item in this loop's turn (getters of one loop wait first come, first
        served; only the first watches the pipe), and take it on the loop's thread.

        :data:`NOTHING` sends the getter on to the reader thread. It leaves the turn right before
        it goes, and the next getter runs only once this one is parked in the reader's FIFO, so
        it goes there behind this one: the order holds. ``tried``: the pipe was found empty just
        now.

        **Cancellation**: safe; a cancelled getter read nothing, and passes the turn on.
        """
        turns = self._turns
        self._turn_getters += 1
        try:
            await turns.acquire()
        except BaseException:
            self._turn_getters -= 1
            raise
        try:
            item = NOTHING
            if self._reader.idle:
                if not tried:
                    item = self._take_shared(owe=False)
                if item is NOTHING:
                    item = await self._wait_shared()
            return item
        finally:
            self._turn_getters -= 1
            turns.release()

    async def _wait_shared(self) -> Any:
        """Wait on the event loop's own thread until an item arrives in the shared queue's pipe,
        and take it there: no thread hop, which is what makes a round trip fast.

        It waits one slice (POLL_SLICE) at most: :data:`NOTHING` hands the wait over to the
        reader thread, which looks after shutdown, dead processes and closing between its slices,
        and takes what this cannot take at once (the read lock is busy, a frame arrived in part,
        a control frame). A wake-up that finds the pipe empty (another process took the item, or
        the loop reported readiness seen before the last read) waits again.

        **Cancellation**: safe; nothing is read while this waits.
        """
        channel = cast(SyncQueue[T], self._channel)
        pid = os.getpid()
        if self._watch is None or self._watch_pid != pid:
            # A forked child makes its own: an epoll is shared with the process it came from.
            self._close_closing_fd()  # in a child: its copy of its parent's
            self._epoll = select.epoll()
            self._epoll.register(channel.reader_fd, select.EPOLLIN)
            self._closing_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._close_closing_fd = weakref.finalize(self, os.close, self._closing_fd)
            self._epoll.register(self._closing_fd, select.EPOLLIN)
            self._watch = FdWatch(self._epoll.fileno(), self._on_idle_readable)
            self._watch_pid = pid
        watch = self._watch
        deadline = time.monotonic() + POLL_SLICE
        self._watching = True
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not await watch.wait(left) or not self._reader.idle:
                    return NOTHING
                item = self._take_shared(owe=True)
                if item is not NOTHING or channel.has_partial or available(channel.reader_fd):
                    return item
        finally:
            self._watching = False
            if self._closed:
                self._release_watch()

    def _on_idle_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread: data arrived while no getter waits there: stop watching, or the
        loop would spin (the next wait watches again)."""
        if self._watch is not None:
            self._watch.stop(loop)

    def _release_watch(self) -> None:
        """Close this process's epoll once no loop watches it (a loop running on another thread
        keeps it until the queue is collected)."""
        watch = self._watch
        if watch is None or self._watching or self._watch_pid != os.getpid():
            return
        if watch.release():
            self._epoll.close()
            self._close_closing_fd()
            self._watch = self._epoll = None

    async def get_batch(self, max_items: int) -> list[T]:
        """Wait for at least one item, and return it with those already available, up to
        ``max_items`` in all.

        **Cancellation**: as :meth:`get`; the items taken for a cancelled call stay in this
        process, in order, for the next getter.
        """
        if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1:
            raise ValueError(f"max_items must be an int >= 1, not {max_items!r}")
        await self._checkpoints.tick()
        self._check_open()
        items = self._reader.take_many_nowait(max_items)
        tried = self._reader.idle and not self._turns.busy
        if tried:
            self._take_more(items, max_items)
        if not items and self._loop_waits and not self._turns.held_elsewhere():
            item = await self._wait_in_turn(tried=tried)
            if item is not NOTHING:
                items.append(item)
                if self._reader.idle:
                    self._take_more(items, max_items)
        if not items:
            items = await self._reader.take(max_items)
        for i, item in enumerate(items):
            if type(item) is UnpicklingFailed:
                # Hand out the good items before it; or raise it, and keep the rest for later.
                handed = i or 1
                self._reader.give_back(items[handed:])
                del items[handed:]
                break
        if self._channel.is_shutdown_immediate:
            self._discard_local(len(items))
            raise ShutDown
        self._channel.release_room(len(items))
        if type(items[-1]) is UnpicklingFailed:
            cast(UnpicklingFailed, items.pop()).raise_error()
        return items

    def _take_more(self, items: list[Any], max_items: int) -> None:
        """Add items that have arrived in the shared queue to ``items``, up to ``max_items``."""
        try:
            while len(items) < max_items:
                item = self._take_shared(owe=False)
                if item is NOTHING:
                    return
                items.append(item)
        except BaseException:
            self._reader.give_back(items)
            raise

    def get_nowait(self) -> T:
        """Remove and return an item that has arrived, or raise :class:`aioipc.Empty`.

        It takes an item already in this process, or a whole item that has arrived in the shared
        queue, as :meth:`multiprocessing.Queue.get_nowait` does, without blocking the event loop:
        an item still being written by its producer counts as not there yet (this process then
        finishes reading it for its next get). Raises :class:`aioipc.ShutDown` once the queue is
        shut down and drained.
        """
        try:
            item = self._reader.take_nowait()
        except IndexError:
            self._check_open()
            if not self._reads_inline:
                taken = self._channel.take_nowait()  # type: ignore[union-attr]
                if not taken:
                    raise Empty from None
                items, end = self._channel._unmark(taken)  # type: ignore[union-attr]
                if end is not None:
                    self._reader.end(end)
                    raise copy.copy(end) from None  # the reader keeps the original, untouched
                item = items[0]
            else:
                idle = self._reader.idle and not self._turns.busy
                item = self._take_shared(owe=True) if idle else NOTHING
                if item is NOTHING:
                    channel = self._channel
                    if channel.is_shutdown and channel.qsize() <= 0:
                        raise ShutDown from None
                    raise Empty from None
        return self._hand_out(item)

    def _take_shared(self, *, owe: bool) -> Any:
        """An item that has arrived in the shared queue, taken on this thread without waiting,
        or :data:`NOTHING` if there is none (or another process is reading). With ``owe``, a
        frame found partly arrived is finished by the reader thread for a later get (nobody will
        wait for it otherwise)."""
        channel = self._channel
        if isinstance(channel, SyncQueue):
            item = channel.take_item()  # the slot of a bounded queue is freed by _hand_out
            if item is NOTHING:
                if owe and channel.has_partial:
                    self._reader.owe()
                return NOTHING
        else:
            if not self._reads_inline:
                return NOTHING
            items, end = channel._unmark(channel.take_nowait())
            if end is not None:
                item = EndMarker(end)
            elif not items:
                return NOTHING
            else:
                item = items[0]
        if type(item) is EndMarker:
            self._reader.end(item.error)
            raise copy.copy(item.error)
        return item

    def _hand_out(self, item: T) -> T:
        """An item leaves this process's hands: free its slot; raise what it stands for."""
        channel = self._channel
        if channel.is_shutdown_immediate:
            self._discard_local(1)
            raise ShutDown
        if self._bounded:
            channel.release_room()
        if type(item) is UnpicklingFailed:
            cast(UnpicklingFailed, item).raise_error()
        return item

    def _discard_local(self, taken: int) -> None:
        """After an immediate shutdown: drop what this process holds, counting it as done."""
        dropped = self._reader.end(ShutDown(), discard=True)
        self._channel.discard_taken(taken + len(dropped))

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

        Items other processes hold for their coroutines are not counted. Works on every platform,
        macOS too.
        """
        return self._channel.qsize() + len(self._reader.buffer)

    def empty(self) -> bool:
        """True if :meth:`qsize` is 0."""
        return self.qsize() == 0

    def full(self) -> bool:
        """True if the queue is bounded and has no room."""
        channel = self._channel
        if isinstance(channel, _Foreign) and not channel.maxsize:
            return bool(channel.obj.full())  # a manager's proxy does not tell its maxsize
        return bool(self.maxsize) and self.qsize() >= self.maxsize

    # -- shutdown --

    def shutdown(self, immediate: bool = False) -> None:
        """Shut the queue down, for every process that uses it.

        ``put`` then raises :class:`aioipc.ShutDown` everywhere; ``get`` returns the items still
        queued, then raises it, and ``async for`` ends. With ``immediate=True`` the queued items,
        and those any process holds for its coroutines, are discarded and counted as done (as
        with ``task_done()``), and every waiter wakes at once. Waiters in other processes wake
        within about 100 ms (at once, as a rule).
        """
        self._check_open()
        self._channel.shutdown(immediate)
        if immediate:
            self._discard_local(0)

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
        if not isinstance(self._channel, SyncQueue):
            raise TypeError(
                "link() needs a queue made by aioipc, not one adopted with Queue.wrap()"
            )
        if self._supervised is None:
            self._supervised = _Supervised(self)
        link_producers(self._supervised, producers)

    # -- closing --

    def close(self) -> None:
        """Release this process's threads and file descriptors. Idempotent, never blocks for long.

        Waiting coroutines are woken with :class:`aioipc.ClosedResourceError`, later calls raise
        it, and so does a ``put()`` waiting for room (its item was not put). Items this process
        holds for its coroutines go back into the queue (at its end): nothing is lost. Other
        processes are not affected. A queue made by :meth:`wrap` leaves the wrapped object open.
        """
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._joiner.close()
        if self._watching and self._watch_pid == os.getpid():
            os.eventfd_write(self._closing_fd, 1)  # the getter watching the pipe wakes now
        self._release_watch()
        leftover = self._reader.close()
        self._channel.giveback(leftover)
        if self._owns_channel:
            self._channel.close()

    def statistics(self) -> QueueStatistics:
        """A snapshot of this queue as seen from this process."""
        reader, writer = self._reader.statistics(), self._writer.statistics()
        return QueueStatistics(
            waiting_getters=reader["waiting"] + self._turn_getters,
            waiting_putters=writer["waiting"],
            buffered=reader["buffered"],
            qsize=0 if self._closed else self.qsize(),
            threads=reader["threads"] + writer["threads"] + self._joiner.statistics()["threads"],
        )


class _Supervised:
    """This queue as supervision sees it (``_supervision.Supervised``): a few named operations,
    called from the watcher thread. It refers to the queue weakly, so the queue's life is its
    own."""

    __slots__ = ("__weakref__", "_channel", "_queue")

    def __init__(self, queue: Queue[Any]) -> None:
        assert isinstance(queue._channel, SyncQueue)
        self._queue = weakref.ref(queue)
        self._channel: SyncQueue[Any] = queue._channel

    @property
    def closed(self) -> bool:
        queue = self._queue()
        return queue is None or queue._closed

    @property
    def is_shutdown(self) -> bool:
        return self._channel.is_shutdown

    def recover(self) -> bool:
        return self._channel.recover()

    def end_here(self, error: BaseException) -> None:
        queue = self._queue()
        if queue is not None:
            queue._reader.end(error)

    def end_stream(self, error: BaseException) -> None:
        self._channel.end_stream(error)


def _reserve_room(channel: SyncQueue[Any], job: Job[bool]) -> bool:
    """In the writer thread: take a slot of a full bounded queue for a waiting ``put``."""
    while not job.abandoned:
        if channel.acquire_room(True, POLL_SLICE):
            if job.commit():
                return True
            channel.release_room()
            break
    return False


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

    @property
    def sync(self) -> JoinableSyncQueueLike[T]:
        """The blocking face of this queue, with ``task_done()`` and ``join()`` (see
        :attr:`Queue.sync`)."""
        return cast(JoinableSyncQueueLike[T], super().sync)

    def task_done(self) -> None:
        """Mark one item taken earlier as processed. Raises ``ValueError`` if called more times
        than items were put."""
        self._check_open()
        self._channel.task_done()

    async def join(self) -> None:
        """Wait until every item put (by any process) has been taken and marked done with
        :meth:`task_done`.

        As with Python 3.13's :class:`asyncio.Queue`, a shutdown does not end the wait by itself:
        ``shutdown(immediate=True)`` counts the items it discards as done, and items already
        handed out still need their ``task_done()``.

        **Cancellation**: a cancellation point; cancelling the wait changes nothing in the queue.
        """
        await self._checkpoints.tick()
        self._check_open()
        channel = self._channel
        if isinstance(channel, SyncQueue):
            if channel.joined():
                return
            await self._joiner.run(lambda job: _join_waiting(channel, job))
        else:
            await self._joiner.run(channel.join_waiting)


def _join_waiting(channel: SyncQueue[Any], job: Job[None]) -> None:
    while not job.abandoned:
        if channel.join(timeout=POLL_SLICE):
            job.commit()
            return
