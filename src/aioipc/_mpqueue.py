"""The cross-process queue behind ``aioipc.Queue``: a pipe of framed pickles, shared by processes.

It is built from the same parts as :class:`multiprocessing.Queue` (a pipe, a read lock, a write
lock, a semaphore for ``maxsize``, a feeder thread per process) plus a small shared state block
that gives what the standard queue lacks: ``qsize()`` on every platform, ``shutdown()`` seen by
every process, and the unfinished-task count of a joinable queue. Items are pickled by the caller
of ``put`` (so an unpicklable item raises there, not later in the feeder thread).

The frames on the pipe are those of :class:`multiprocessing.connection.Connection`: a 4-byte
big-endian length (or -1 and an 8-byte length), then the pickle.

:class:`SyncQueue` is the blocking face for synchronous code in any process; the async face in
``_queue.py`` reads the same pipe through the bridge's reader thread (:meth:`SyncQueue.read`).
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import select
import threading
import time
import weakref
from multiprocessing import context, util
from multiprocessing.connection import Pipe
from multiprocessing.reduction import ForkingPickler
from typing import Any, Generic, NoReturn, TypeVar, cast

from . import _fork
from ._exceptions import BrokenResourceError, Empty, Full, ShutDown
from ._wire import (
    HEADER,
    LARGE_FRAME,
    PIPE_BUF,
    POLL_SLICE,
    Frame,
    available,
    dumps,
    frame,
    read_available,
    read_frame_watched,
    read_watched,
    write_nowait,
    write_watched,
)

T = TypeVar("T")

#: ``join()`` first sleeps this long between looks at the shared count, doubling up to POLL_SLICE.
_JOIN_FIRST_SLEEP = 0.001
#: The largest ``maxsize``: a POSIX semaphore's SEM_VALUE_MAX on Linux and macOS.
MAXSIZE_LIMIT = 2**31 - 1

# Shared state block: indices into a RawArray of signed 64-bit integers, laid out so that what
# writers touch for every item and what readers touch for every item are 64 bytes apart (a
# producer and a consumer on two cores do not pull one cache line back and forth).
# Items written to the pipe (counted by the holder of the write lock, just before it writes),
# who holds the write lock (a pid, 0: nobody), and whether it is in the middle of an item (so
# that a holder found dead can be replaced, or the stream declared cut).
_PUT, _WHOLDER, _WMID = 0, 1, 2
# Items read from the pipe (counted by the holder of the read lock), and the same for that lock.
_TAKEN, _RHOLDER, _RMID = 8, 9, 10
# The rest changes rarely: shutdown, unfinished tasks of a joinable queue, the pid of a process
# that died in the middle of an item and on which side (_READING/_WRITING), who holds the state
# lock (never held in the middle of an item), and the items held by feeder threads that found
# no record of their own (see below).
_SHUTDOWN, _UNFINISHED, _BROKEN, _BROKEN_SIDE, _SHOLDER, _UNRECORDED = 16, 17, 18, 19, 20, 21
# Records of the items each process handed to its feeder thread and has not written yet: pairs
# (pid, count) from _FEEDERS on, each written by its own process only. Those items hold their
# slot of a bounded queue and are counted as queued; a process that finds the owner of a record
# dead frees them (they died with it).
_FEEDERS, _FEEDER_RECORDS = 24, 32
_STATE_SLOTS = _FEEDERS + 2 * _FEEDER_RECORDS
_READING, _WRITING = 1, 2
_OPEN, _SHUT_GRACEFUL, _SHUT_IMMEDIATE = 0, 1, 2


class _ShutdownMarker:
    """Sent down the pipe by ``shutdown()``, after every item put before it.

    A reader that takes it puts it back, so every process sees it; it wakes every waiter at once.
    """

    def __reduce__(self) -> str:
        return "SHUTDOWN_MARKER"

    def __repr__(self) -> str:
        return "<aioipc shutdown marker>"


SHUTDOWN_MARKER = _ShutdownMarker()
#: The first byte of every item's frame: pickle's PROTO opcode (protocol 2 and later). Control
#: frames start with another byte, so that a reader counts the items it takes without unpickling.
_PROTO = 0x80
#: The frame ``shutdown()`` sends after every item put before it.
_MARK = b"\x00shutdown"
#: The first byte of an end frame; the pickled :class:`EndMarker` follows.
_END = b"\x01"
#: What a look that cannot wait returns when there is nothing.
NOTHING: Any = object()


class UnpicklingFailed:
    """Stands in the item stream for an item that could not be unpickled in this process; the get
    that receives it raises the error (the queue goes on)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error: BaseException | None = error

    def raise_error(self) -> NoReturn:
        """Raise the error once and let go of it (no cycle through the raising frame's locals)."""
        error, self.error = self.error, None
        assert error is not None
        try:
            raise error
        finally:
            del error


class EndMarker:
    """Ends the queue for every reader that reaches it, with ``error``, after the items put before
    it; a reader that takes it puts it back for the next process. Supervision sends one when the
    queue's producers are gone."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def loads(frame: Frame) -> Any:
    """Unpickle an item; whatever its unpickling raises (``SystemExit`` too, but not a
    ``KeyboardInterrupt`` of this process) stands in for it, to be raised at its ``get``."""
    try:
        return ForkingPickler.loads(frame)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return UnpicklingFailed(exc)


#: How long ``close()`` waits for this process's feeder thread to write what it holds (it may wait
#: behind a lock another process holds); at interpreter exit the wait has no limit, as with
#: multiprocessing's own feeder. A bound on a rare wait: no test or benchmark pins the value.
FEEDER_CLOSE_TIMEOUT = 5.0
#: The priority of the feeder's exit hook among multiprocessing's finalizers: that of
#: multiprocessing's own queue feeders, which are joined after the finalizers of higher priority.
_FEEDER_EXIT_PRIORITY = -5

#: Bytes a queue's pipe may hold once large items go through it (Linux lets an unprivileged
#: process go up to pipe-max-size, 1 MiB by default): room for several large items, so that a
#: writer rarely waits for the reader. Pipes count against a per-user budget (64 MiB by default),
#: so a queue's pipe grows only when the first item that would not fit the default size is put.
#: Pinned by the 64 KiB and 1 MiB throughput rows of the benchmarks.
PIPE_SIZE = 1 << 20


def _grow_pipe(fd: int) -> None:
    """Enlarge a pipe's buffer where the platform allows it (Linux); keep the default otherwise."""
    import fcntl

    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        try:
            fcntl.fcntl(fd, set_size, PIPE_SIZE)
        except OSError:  # over pipe-max-size or the per-user pipe quota: the default still works
            pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            status = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: it exists
    return status not in (b"Z", b"X")


class _Owned:
    """One of a queue's cross-process locks (read, write or state), with its holder's pid recorded
    in the shared state block, and whether the holder is in the middle of an item.

    A process that waits for the lock and finds the holder dead takes its place if the holder
    died between two items (the stream is whole), or declares the stream cut if it died in the
    middle of one (every getter and putter then raises :class:`aioipc.BrokenResourceError`). The
    decision is by process state, never by how long the lock was held: a slow or stopped holder
    keeps its lock.
    """

    __slots__ = ("_holder", "_lock", "_mid", "_pid", "_side", "_state", "_xlock")

    def __init__(self, lock: Any, xlock: Any, state: Any, holder: int, mid: int, side: int) -> None:
        self._lock = lock
        self._xlock = xlock
        self._state = state
        self._holder = holder
        self._mid = mid
        self._side = side
        self._pid = os.getpid()

    def try_acquire(self) -> bool:
        """Take the lock if it is free now."""
        if self._lock.acquire(False):
            self._state[self._holder] = self._pid
            return True
        return False

    def acquire(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for the lock, in slices; replace a
        holder that died between two items. Raises BrokenResourceError if it died inside one, or
        (read and write locks) once any process found the stream cut."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_SLICE if deadline is None else min(POLL_SLICE, deadline - time.monotonic())
            if self._lock.acquire(True, max(wait, 0)):
                self._state[self._holder] = self._pid
                return True
            if self._mid >= 0 and self._state[_BROKEN]:  # the stream is cut: nothing to wait for
                raise broken_error(int(self._state[_BROKEN]), int(self._state[_BROKEN_SIDE]))
            if self.inherit():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def inherit(self) -> bool:
        """Take the place of a dead holder that was between two items (the lock stays taken, now
        by this process). Raises BrokenResourceError if it died in the middle of an item."""
        state = self._state
        pid = int(state[self._holder])
        if pid in (0, self._pid) or _alive(pid):
            return False
        with self._xlock:  # one process takes the dead one's place
            if state[self._holder] != pid:  # another process took its place first
                return False
            if self._mid >= 0 and state[self._mid]:
                state[_BROKEN_SIDE] = self._side
                state[_BROKEN] = pid
                raise broken_error(pid, self._side)
            state[self._holder] = self._pid
            return True

    def __enter__(self) -> None:
        self.acquire(None)

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def begin_item(self) -> None:
        """The holder starts reading or writing an item."""
        self._state[self._mid] = 1

    def end_item(self) -> None:
        """The holder is between two items again."""
        self._state[self._mid] = 0

    def release(self) -> None:
        state = self._state
        if self._mid >= 0:
            state[self._mid] = 0
        state[self._holder] = 0
        self._lock.release()


def broken_error(pid: int, side: int) -> BrokenResourceError:
    what = "reading" if side == _READING else "writing"
    return BrokenResourceError(
        f"a process of this queue (pid {pid}) died in the middle of {what} an item, which cut "
        "the queue's stream: no process can get from it any more"
    )


def _check_cut(state: Any, r: _Owned, w: _Owned) -> None:
    """Raise :class:`aioipc.BrokenResourceError` if the queue's stream is cut: recorded so by any
    process, or found so now (the holder of the read or write lock died inside an item; this
    records it for every process). A holder that died between two items is replaced, and its
    lock given back. Called by every waiter between two slices of its wait."""
    pid = state[_BROKEN]
    if pid:
        raise broken_error(int(pid), int(state[_BROKEN_SIDE]))
    for owned in (r, w):
        if owned.inherit():
            owned.release()


class _Partial:
    """A frame this process has started to read before all of it had arrived: the process keeps
    the read lock until the frame is whole (nobody else could find the next frame). ``head`` is
    what arrived of the header while ``body`` is None; then ``got`` bytes of ``body``."""

    __slots__ = ("body", "got", "head")

    def __init__(self, head: bytes, body: bytearray | None = None, got: int = 0) -> None:
        self.head = head
        self.body = body
        self.got = got


#: What :meth:`_Feeder._write_small` stopped at.
_EMPTY, _FULL, _LARGE = 0, 1, 2


class _Feeder:
    """The pickles this process put that could not be written at once (the pipe was full, or
    another process was writing), in order, and the thread that writes them once there is room:
    ``put`` never waits for room in the pipe.

    Whoever holds ``_writing`` writes from the buffer: the thread, or a ``put`` that finds it
    free (:meth:`write_ready`). The second keeps the pipe fed while this process's own code keeps
    the GIL busy, which would otherwise let the thread write once per switch interval (5 ms).
    Small frames go in groups of at most PIPE_BUF bytes, each written whole or not at all without
    waiting, so the stream is at an item boundary whatever happens to this process; the thread
    waits for room holding no lock. Only a larger frame is "in an item": the thread alone writes
    it, holding the write lock until it is whole (a process killed meanwhile cuts the stream).
    """

    def __init__(self, queue: SyncQueue[Any], *, join_at_exit: bool) -> None:
        self.join_at_exit = join_at_exit
        self._fd = queue._writer.fileno()
        self._w = queue._w
        self._s = queue._s
        self._state = queue._state
        #: Where this process counts the items it holds unwritten (-1: every record is taken by a
        #: live process; they are then counted under the state lock, and not freed if it dies).
        self._record = queue._claim_record()
        #: Raises if the stream is cut while this thread waits for room (the queue itself is not
        #: referenced: the thread must not keep it alive).
        self._check = functools.partial(_check_cut, queue._state, queue._r, queue._w)
        self._cond = threading.Condition(threading.Lock())
        #: Pickles to write, each with whether it is a counted item (not a marker).
        self._buffer: collections.deque[tuple[memoryview | bytes, bool]] = collections.deque()
        #: Held by whoever writes from the buffer.
        self._writing = threading.Lock()
        #: Items taken from the buffer and not yet written.
        self._inflight = 0
        #: The thread waits for something to write (not for room).
        self._asleep = False
        self._closing = False
        #: Whether the pipe has room for a write of PIPE_BUF bytes: ``_poller`` for the thread,
        #: ``_room`` for puts (a poll object serves one thread at a time).
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLOUT)
        self._room = select.poll()
        self._room.register(self._fd, select.POLLOUT)
        self._thread = threading.Thread(target=self._run, name="aioipc-queue-feeder", daemon=True)
        self._thread.start()
        # Flush what this process put before it exits (multiprocessing's own queues do the same).
        self._finalizer = util.Finalize(
            self, _Feeder._flush, (weakref.ref(self),), exitpriority=_FEEDER_EXIT_PRIORITY
        )

    def discard(self) -> int:
        """Drop what was put and not yet written (an immediate shutdown); return how many items
        that was."""
        with self._cond:
            n = sum(1 for _, counted in self._buffer if counted)
            self._buffer.clear()
            self._count(-n)
        return n

    def put(self, data: memoryview | bytes, counted: bool) -> None:
        """Add a pickle behind the others, and write what can be written now; ``counted`` if it
        is an item (it holds a slot of a bounded queue and is counted as queued), not a marker."""
        cond = self._cond
        with cond:
            self._buffer.append((data, counted))
            if counted:
                self._count(1)
        if not self.write_ready():
            with cond:
                if self._asleep:
                    cond.notify()

    def write_ready(self) -> bool:
        """Write the small frames at the front of the buffer while the pipe has room for them,
        without waiting for anything; True if the buffer is empty after."""
        if not self._writing.acquire(False):
            return False
        try:
            if not self._room.poll(0) or not self._w.try_acquire():
                return False
            try:
                return self._write_small() == _EMPTY
            except OSError:  # the thread meets it again, and deals with it
                return False
            finally:
                self._w.release()
        finally:
            self._writing.release()

    def _count(self, n: int) -> None:
        """Add ``n`` to the items this process holds unwritten (cond held)."""
        if not n:
            return
        if self._record >= 0:
            self._state[self._record] += n
        else:
            with self._s:
                self._state[_UNRECORDED] += n

    def _take(self) -> list[tuple[memoryview | bytes, bool]]:
        """Take the small frames at the front of the buffer, up to PIPE_BUF bytes in all (cond
        held; none if a large frame is first)."""
        buffer = self._buffer
        size = taken = 0
        for data, _ in buffer:
            size += len(data) + HEADER.size
            if size > PIPE_BUF:
                break
            taken += 1
        self._inflight = taken  # before the buffer shrinks: see idle()
        return [buffer.popleft() for _ in range(taken)]

    def _write_small(self) -> int:
        """Write groups of small frames from the front of the buffer, each whole or not at all,
        until it is empty (:data:`_EMPTY`), the pipe has no room for the next group
        (:data:`_FULL`), or a large frame is next (:data:`_LARGE`). ``_writing`` and the write
        lock are held. Items are counted written just before their write (a reader may count an
        item a moment early, never late), and no longer held by this process after."""
        cond, state = self._cond, self._state
        while True:
            with cond:
                if not self._buffer:
                    return _EMPTY
                group = self._take()
            if not group:
                return _LARGE
            counted = sum(is_item for _, is_item in group)
            state[_PUT] += counted
            try:
                write_nowait(
                    self._fd, b"".join([part for data, _ in group for part in frame(data)])
                )
            except BaseException as exc:
                state[_PUT] -= counted
                with cond:  # back to the front, in order
                    self._buffer.extendleft(reversed(group))
                    self._inflight = 0
                if isinstance(exc, BlockingIOError):
                    return _FULL
                raise
            with cond:
                self._count(-counted)
                self._inflight = 0

    def _write_large(self) -> None:
        """Write the large frame at the front of the buffer, waiting for room as long as it takes
        (``_writing`` and the write lock are held). If that fails, the item is dropped."""
        with self._cond:
            data, counted = self._buffer.popleft()
            self._inflight = 1
        try:
            self._state[_PUT] += counted
            self._w.begin_item()
            for chunk in frame(data):
                write_watched(self._fd, chunk, self._check)
            self._w.end_item()
        finally:
            with self._cond:
                self._count(-counted)
                self._inflight = 0

    def _run(self) -> None:
        cond, buffer = self._cond, self._buffer
        while True:
            with cond:
                self._asleep = True
                while not buffer and not self._closing:
                    cond.wait()
                self._asleep = False
                if not buffer:
                    cond.notify_all()
                    return
            if not self._writing.acquire(False):
                time.sleep(0)  # a put is writing: let it finish
                continue
            try:
                try:
                    self._w.acquire(None)
                    try:
                        while (stop := self._write_small()) == _LARGE:
                            self._write_large()
                    finally:
                        self._w.release()
                finally:
                    self._writing.release()
                if stop == _FULL and not self._poller.poll(POLL_SLICE * 1000):
                    self._check()  # no room yet: wait on, unless nobody will read any more
            except (OSError, BrokenResourceError) as exc:
                # Every reader is gone, or the stream is cut: nothing can be delivered any more.
                if isinstance(exc, OSError) and exc.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                with cond:
                    self._count(-sum(1 for _, counted in buffer if counted))
                    buffer.clear()
                    self._closing = True

    @property
    def idle(self) -> bool:
        """Nothing this process put is waiting to be written (so a new item may overtake none)."""
        return not self._buffer and not self._inflight

    @staticmethod
    def _flush(ref: weakref.ref[_Feeder]) -> None:
        feeder = ref()
        if feeder is not None and feeder.join_at_exit:
            feeder.close(timeout=None)

    def close(self, timeout: float | None = FEEDER_CLOSE_TIMEOUT) -> None:
        """Write what is buffered, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


_live_queues: weakref.WeakSet[SyncQueue[Any]] = weakref.WeakSet()


def _reset_queues_after_fork() -> None:
    for queue in list(_live_queues):
        if not queue._closed:
            queue._reset_local()


_fork.register(_reset_queues_after_fork)


class SyncQueue(Generic[T]):
    """The blocking face of an aioipc queue, for synchronous code in any process.

    It has the methods of :class:`multiprocessing.Queue` (and, when joinable, of
    :class:`multiprocessing.JoinableQueue`), and honours :meth:`shutdown` like the async face:
    ``put`` raises :class:`aioipc.ShutDown` and ``get`` returns what is still queued, then raises
    it. A blocked ``get`` waits for data without holding the queue's read lock, so a consumer
    killed while it waits blocks nobody.
    Pass it (or the async queue that owns it) to child processes as an argument.
    """

    def __init__(
        self, maxsize: int = 0, *, ctx: context.BaseContext | None = None, joinable: bool = False
    ) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
        if maxsize > MAXSIZE_LIMIT:
            raise ValueError(
                f"maxsize must be at most {MAXSIZE_LIMIT} (a semaphore's limit), not {maxsize}"
            )
        if ctx is None:
            import multiprocessing

            ctx = multiprocessing.get_context()
        elif not isinstance(ctx, context.BaseContext):
            raise TypeError(
                "ctx must be a multiprocessing context (multiprocessing.get_context(...)), "
                f"not {type(ctx).__name__}"
            )
        self._maxsize = maxsize if maxsize > 0 else 0
        self._reader, self._writer = Pipe(duplex=False)
        # Writers wait for room themselves (poll), so that a put can try a write that cannot block.
        os.set_blocking(self._writer.fileno(), False)
        self._rlock = ctx.Lock()
        self._wlock = ctx.Lock()
        self._slock = ctx.Lock()
        #: Taken only to replace a dead holder of one of the three locks above.
        self._xlock = ctx.Lock()
        self._sem = ctx.BoundedSemaphore(maxsize) if maxsize > 0 else None
        self._state = ctx.RawArray("q", _STATE_SLOTS)
        self._joinable = joinable
        self._closed = False
        self._reset_local()

    def _reset_local(self) -> None:
        """Forget this process's threads (at creation, unpickling, and in a forked child)."""
        self._pid = os.getpid()
        self._feeder: _Feeder | None = None
        self._join_feeder_at_exit = True
        self._pipe_grown = False
        self._partial: _Partial | None = None
        #: Serialises the threads of this process that may finish a partly read frame.
        self._partial_lock = threading.Lock()
        self._fd = self._reader.fileno()
        self._wfd = self._writer.fileno()
        #: Where a header is read (by the holder of the read lock only).
        self._head = bytearray(HEADER.size)
        #: The read and write locks as this process uses them (recording their holder).
        self._r = _Owned(self._rlock, self._xlock, self._state, _RHOLDER, _RMID, _READING)
        self._w = _Owned(self._wlock, self._xlock, self._state, _WHOLDER, _WMID, _WRITING)
        #: The state lock guards a few counters: never held in the middle of an item.
        self._s = _Owned(self._slock, self._xlock, self._state, _SHOLDER, -1, 0)
        _live_queues.add(self)

    def __getstate__(self) -> tuple[Any, ...]:
        context.assert_spawning(self)
        return (
            self._maxsize, self._reader, self._writer, self._rlock, self._wlock, self._slock,
            self._xlock, self._sem, self._state, self._joinable,
        )  # fmt: skip

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (
            self._maxsize, self._reader, self._writer, self._rlock, self._wlock, self._slock,
            self._xlock, self._sem, self._state, self._joinable,
        ) = state  # fmt: skip
        self._closed = False
        self._reset_local()

    def __repr__(self) -> str:
        return f"<aioipc.SyncQueue maxsize={self._maxsize} at {id(self):#x}>"

    @property
    def maxsize(self) -> int:
        """The capacity given at creation; 0 means unbounded."""
        return self._maxsize

    # -- putting --

    def put(self, obj: T, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` into the queue, waiting for room if the queue is bounded and full.

        Raises :class:`aioipc.Full` if there is no room within ``timeout`` (or at once when
        ``block`` is false), :class:`aioipc.ShutDown` if the queue was shut down,
        :class:`aioipc.BrokenResourceError` naming the dead process if the queue's stream was cut
        (before or while it waits), ``TypeError`` if ``obj`` cannot be pickled, ``ValueError`` if
        this process closed the queue.
        """
        self._check_open()
        data = dumps(obj)
        if self._sem is not None and not self.acquire_room(block, timeout):
            raise Full
        self.feed(data)

    def put_nowait(self, obj: T) -> None:
        """Put ``obj`` without waiting; raise :class:`aioipc.Full` if a bounded queue is full."""
        self.put(obj, block=False)

    def acquire_room(self, block: bool = True, timeout: float | None = None) -> bool:
        """Take a slot of a bounded queue, waiting up to ``timeout`` (always True when unbounded).

        Raises :class:`aioipc.ShutDown` if the queue is shut down while waiting, and
        :class:`aioipc.BrokenResourceError` if its stream is cut (nobody will make room again).
        """
        sem = self._sem
        if sem is None or sem.acquire(False):
            return True
        if not block:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_shutdown()
            self._check_cut()
            self._free_lost_items()
            wait = POLL_SLICE if deadline is None else min(POLL_SLICE, deadline - time.monotonic())
            if wait <= 0:
                return False
            if sem.acquire(True, wait):
                return True

    def release_room(self, n: int = 1) -> None:
        """Free ``n`` slots of a bounded queue (items handed out by a get)."""
        sem = self._sem
        if sem is not None:
            for _ in range(n):
                try:
                    sem.release()
                except ValueError:
                    # More slots freed than taken: a process killed just after it wrote items,
                    # before it counted them written, had them freed as lost (see
                    # _free_lost_items). The bound holds; one count too many is dropped.
                    break

    def feed(self, data: memoryview | bytes) -> None:
        """Put a pickled item whose slot is taken: write it now if that cannot block, else hand it
        to the feeder. Raises :class:`aioipc.ShutDown` (the slot is freed) once the queue is shut
        down, and :class:`aioipc.BrokenResourceError` once its stream is cut."""
        if self._joinable:
            with self._s:
                self._refuse_if_closed()
                self._state[_UNFINISHED] += 1
            try:
                self._feed_raw(data, counted=True, refusable=True)
            except (ShutDown, BrokenResourceError):
                with self._s:
                    self._state[_UNFINISHED] -= 1
                raise
        else:
            self._feed_raw(data, counted=True, refusable=True)

    def _refuse_if_closed(self) -> None:
        """Raise if the queue takes no more items (shut down, or its stream cut), freeing the slot
        the item took."""
        state = self._state
        if state[_SHUTDOWN] or state[_BROKEN]:
            if self._sem is not None:
                self._sem.release()
            self._check_broken()
            raise ShutDown

    def _feed_raw(
        self, data: memoryview | bytes, *, counted: bool = False, refusable: bool = False
    ) -> None:
        """Write a frame now if that cannot block, else hand it to the feeder. ``counted``: an
        item (not a control frame); ``refusable``: raise as :meth:`_refuse_if_closed` does (a put,
        not a give-back or a marker)."""
        size = len(data)
        if size >= LARGE_FRAME and not self._pipe_grown:
            _grow_pipe(self._writer.fileno())
            self._pipe_grown = True
        feeder = self._feeder
        if size <= PIPE_BUF - HEADER.size and (feeder is None or feeder.idle):
            wlock = self._wlock
            if wlock.acquire(False):
                # One write of at most PIPE_BUF bytes is whole or nothing: the stream stays at an
                # item boundary whatever happens to this process, so it is not "in an item". The
                # shutdown flag is read under the write lock: an item that passes is written
                # before the marker of a shutdown that comes later.
                state = self._state
                state[_WHOLDER] = self._pid
                try:
                    if refusable and (state[_SHUTDOWN] or state[_BROKEN]):
                        self._refuse_if_closed()
                    state[_PUT] += counted  # before the write: a reader never counts it late
                    try:
                        os.write(self._wfd, HEADER.pack(size) + data)
                        return
                    except BlockingIOError:  # the pipe is full: the feeder will wait for room
                        state[_PUT] -= counted
                finally:
                    state[_WHOLDER] = 0
                    wlock.release()
        if refusable:
            self._refuse_if_closed()
        if feeder is None:
            feeder = self._feeder = _Feeder(self, join_at_exit=self._join_feeder_at_exit)
        feeder.put(data, counted)

    # -- getting --

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return an item, waiting for one if needed.

        It waits for data without holding the queue's read lock; the lock is held only while an
        item that has arrived is read. Raises :class:`aioipc.Empty` if no item has started to
        arrive within ``timeout`` (or at once when ``block`` is false): an item whose first bytes
        came in time is read whole, however long its live writer takes to write the rest (a
        stopped writer holds it up; giving up in the middle would leave the stream cut).
        Raises :class:`aioipc.ShutDown` once the queue is shut down and drained,
        :class:`aioipc.BrokenResourceError` naming the dead process once the stream is cut (a
        process died in the middle of writing or reading an item; seen by every process within
        about 50 ms), ``ValueError`` if this process closed the queue.
        """
        self._check_open()
        state = self._state
        data = None
        if state[_SHUTDOWN] != _SHUT_IMMEDIATE and not state[_BROKEN]:
            data = self.take_frame(finish=True, counted=True)
        if data is None:
            data = self._wait_frame(block, timeout)
        item = self._unframe(data)
        if type(item) is EndMarker:
            error = item.error
            try:
                raise error
            finally:
                del error  # no cycle: this frame, the exception, its traceback
        if state[_SHUTDOWN] == _SHUT_IMMEDIATE:
            self.discard_taken(1)
            raise ShutDown
        if self._sem is not None:
            self.release_room()
        if type(item) is UnpicklingFailed:
            item.raise_error()
        return cast(T, item)

    def _wait_frame(self, block: bool, timeout: float | None) -> Frame:
        """The next frame for :meth:`get`, waiting for data in slices without the read lock."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller: select.poll | None = None
        lock_wait = 0.0
        readable = True  # try at once; later, only once the pipe has data
        while True:
            if self._state[_SHUTDOWN] == _SHUT_IMMEDIATE:
                raise ShutDown
            self._check_broken()
            if readable or self._partial is not None:
                data = self.take_frame(finish=True, lock_wait=lock_wait, counted=not lock_wait)
                if data is not None:
                    return data
            if self._drained_after_shutdown():
                raise ShutDown
            wait = POLL_SLICE if deadline is None else min(POLL_SLICE, deadline - time.monotonic())
            if not block or wait <= 0:
                raise Empty
            if poller is None:
                poller = select.poll()
                poller.register(self._fd, select.POLLIN)
            # Wait for data without the read lock (an idle getter never touches it, so one killed
            # while it waits holds nothing); once data is there, wait for the lock.
            readable = bool(poller.poll(wait * 1000))
            lock_wait = wait if readable else 0.0
            if not readable:
                self._check_cut()

    def get_nowait(self) -> T:
        """Remove and return an item if one is there; else raise :class:`aioipc.Empty`."""
        return self.get(block=False)

    def take_frame(
        self, *, finish: bool, lock_wait: float = 0.0, counted: bool = False
    ) -> Frame | None:
        """Take one frame that has arrived, without waiting for data; None if there is none, or
        another reader holds the read lock (for longer than ``lock_wait`` seconds).

        Two reads that cannot wait (``RWF_NOWAIT``), header then body: never more than one
        frame. A frame that has only partly arrived is finished here if ``finish`` (a blocking
        caller); otherwise this process keeps the read lock and the frame for :meth:`read`, and
        None is returned: :attr:`has_partial` tells. With ``counted``, it does not look at all
        while the shared counts say no item is in the pipe (control frames are not counted: a
        caller that waits for readability reads them).
        """
        if self._partial is not None:
            return self._finish_partial() if finish else None
        state = self._state
        if counted and state[_PUT] - state[_TAKEN] <= 0:
            # No item written and not taken: do not touch the read lock just to look (a process
            # killed while it holds the lock to look would leave the stream in doubt).
            return None
        rlock = self._rlock
        if lock_wait:
            if not self._r.acquire(lock_wait):
                return None
        elif rlock.acquire(False):
            state[_RHOLDER] = self._pid
        else:
            return None
        fd = self._fd
        head = self._head
        try:
            state[_RMID] = 1
            got = read_available(fd, head)
            if not got:
                return None
            if got < HEADER.size:
                self._partial = _Partial(bytes(head[:got]))
            else:
                (size,) = HEADER.unpack(head)
                if size < 0:  # a long header (or a broken stream): the blocking reader sorts it
                    self._partial = _Partial(bytes(head))
                else:
                    body = bytearray(size)
                    got = read_available(fd, body) if size else 0
                    if got == size:
                        if size and body[0] == _PROTO:
                            state[_TAKEN] += 1
                        return body
                    self._partial = _Partial(b"", body, got)
        finally:
            if self._partial is None:
                state[_RMID] = 0
                state[_RHOLDER] = 0
                rlock.release()
        return self._finish_partial() if finish else None

    def take_item(self) -> Any:
        """An item that has arrived, taken without waiting (see :meth:`take_frame`), or
        :data:`NOTHING`. The shutdown marker and supervision's end come back as an
        :class:`EndMarker`. The item's slot of a bounded queue stays taken."""
        data = self.take_frame(finish=False, counted=True)
        if data is None:
            return NOTHING
        return self._unframe(data)

    def _unframe(self, data: Frame) -> Any:
        """Unpickle one frame. The shutdown marker and supervision's end are passed on to the
        next process and come back as an :class:`EndMarker`."""
        if data and data[0] == _PROTO:
            return loads(data)
        self._feed_raw(bytes(data))  # a control frame: for the next reader too
        if data == _MARK:
            return EndMarker(ShutDown())
        error = loads(memoryview(data)[len(_END) :])
        if type(error) is UnpicklingFailed:
            error = error.error
        return EndMarker(error)

    @property
    def reader_fd(self) -> int:
        """This process's descriptor of the pipe's read end: readable when data has arrived (an
        event loop may watch it; reading it belongs to the queue)."""
        return self._fd

    @property
    def has_partial(self) -> bool:
        """True while this process holds a frame whose body has not all arrived (and the lock)."""
        return self._partial is not None

    def _finish_partial(self) -> Frame | None:
        """Read the rest of the partly read frame, then release the read lock. It waits as long
        as the frame's writer lives; BrokenResourceError once the stream is cut."""
        with self._partial_lock:
            partial = self._partial
            if partial is None:  # another thread of this process finished it
                return None
            fd = self._fd
            try:
                if partial.body is None:
                    data = read_frame_watched(fd, self._check_cut, partial.head)
                else:
                    read_watched(fd, memoryview(partial.body)[partial.got :], self._check_cut)
                    data = partial.body
                self._count_taken([data])
                return data
            finally:
                self._partial = None
                self._r.release()

    def read(
        self, max_items: int, max_bytes: int, wake_fd: int
    ) -> tuple[list[T], BaseException | None]:
        """For the bridge's reader thread: wait for items without holding the read lock, then take
        up to ``max_items`` whole frames that are there (and about ``max_bytes`` at most), never
        more. Returns early, with nothing, when ``wake_fd`` is readable."""
        fd = self._reader.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        state = self._state
        while True:
            if state[_SHUTDOWN] == _SHUT_IMMEDIATE:
                return [], ShutDown()
            self._check_broken()
            frames: list[Frame] = []
            if self._partial is not None:
                first = self._finish_partial()
                if first is not None:
                    frames.append(first)
            if not frames:
                events = poller.poll(POLL_SLICE * 1000)
                if any(event_fd == wake_fd for event_fd, _ in events):
                    return [], None
                if not events:
                    if self._drained_after_shutdown():
                        return [], ShutDown()
                    self._check_cut()
                    continue
                if not self._r.acquire(POLL_SLICE):
                    continue
                try:
                    if available(fd):
                        self._r.begin_item()
                        frames.append(read_frame_watched(fd, self._check_cut))
                        self._read_more(fd, frames, max_items, max_bytes)
                finally:
                    self._count_taken(frames)
                    self._r.release()
            elif len(frames) < max_items and self._r.try_acquire():
                try:
                    self._r.begin_item()
                    self._read_more(fd, frames, max_items, max_bytes)
                finally:
                    self._count_taken(frames[1:])
                    self._r.release()
            if frames:
                # Prefetched items keep their slot of a bounded queue until a get hands them out.
                return self.decode(frames, release_room=False)

    def _read_more(self, fd: int, frames: list[Frame], max_items: int, max_bytes: int) -> None:
        """Add the frames that have started to arrive, up to the limits (read lock held)."""
        size = sum(len(f) for f in frames)
        while len(frames) < max_items and size < max_bytes and available(fd):
            data = read_frame_watched(fd, self._check_cut)
            frames.append(data)
            size += len(data)

    def _count_taken(self, frames: list[Frame]) -> None:
        """Count the items among frames just read (read lock held)."""
        n = sum(1 for data in frames if data and data[0] == _PROTO)
        if n:
            self._state[_TAKEN] += n

    def decode(
        self, frames: list[Frame], *, release_room: bool = True
    ) -> tuple[list[T], BaseException | None]:
        """Unpickle frames just read; account for them; recognise the shutdown marker.

        With ``release_room`` the items' slots of a bounded queue are freed (they are handed out
        now); otherwise the caller frees them when it hands them out.
        """
        end: BaseException | None = None
        items = []
        for data in frames:
            item = self._unframe(data)
            if type(item) is EndMarker:
                end = item.error
            else:
                items.append(item)
        if self._state[_SHUTDOWN] == _SHUT_IMMEDIATE:
            self.discard_taken(len(items))
            return [], ShutDown()
        if items and release_room:
            self.release_room(len(items))
        return items, end

    def discard_taken(self, n: int) -> None:
        """Items this process took and will never hand out (an immediate shutdown): free their
        slots and count them as done, as :meth:`task_done` would."""
        if n <= 0:
            return
        self.release_room(n)
        if self._joinable:
            with self._s:
                self._state[_UNFINISHED] -= n

    def giveback(self, items: list[T]) -> None:
        """Put items taken by this process back into the queue (at its end)."""
        for item in items:
            self._feed_raw(dumps(item), counted=True)

    # -- size --

    def qsize(self) -> int:
        """The number of items put and not yet taken by any process (approximate while others
        put and get). Works on every platform, macOS included. 0 after an immediate shutdown."""
        if self._state[_SHUTDOWN] == _SHUT_IMMEDIATE:
            return 0
        return max(self._queued(), 0)

    def _queued(self) -> int:
        """Items written and not read, plus those held by feeder threads (which may be briefly
        counted twice as they are written, never missed)."""
        state = self._state
        held = sum(state[_FEEDERS + 1 : _STATE_SLOTS : 2]) + state[_UNRECORDED]
        return int(state[_PUT] - state[_TAKEN] + held)

    def empty(self) -> bool:
        """True if :meth:`qsize` is 0."""
        return self.qsize() == 0

    def full(self) -> bool:
        """True if the queue is bounded and :meth:`qsize` reached ``maxsize``."""
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    # -- shutdown --

    @property
    def is_shutdown(self) -> bool:
        """True once :meth:`shutdown` was called in any process."""
        return bool(self._state[_SHUTDOWN])

    @property
    def is_shutdown_immediate(self) -> bool:
        """True once ``shutdown(immediate=True)`` was called in any process."""
        return bool(self._state[_SHUTDOWN] == _SHUT_IMMEDIATE)

    def shutdown(self, immediate: bool = False) -> None:
        """Shut the queue down for every process.

        Afterwards ``put`` raises :class:`aioipc.ShutDown` everywhere and ``get`` returns the items
        still queued, then raises it. With ``immediate=True`` the queued items are discarded (each
        counted as done, as with :meth:`task_done`) and every waiter wakes at once. Calling it
        again is harmless (and can upgrade to immediate).
        """
        with self._s:
            previous = self._state[_SHUTDOWN]
            self._state[_SHUTDOWN] = _SHUT_IMMEDIATE if immediate else max(previous, _SHUT_GRACEFUL)
        if immediate:
            self._discard_queued()
        if not previous:
            self._feed_raw(_MARK)

    def _discard_queued(self) -> None:
        feeder = self._feeder
        if feeder is not None:
            self.discard_taken(feeder.discard())
        fd = self._reader.fileno()
        try:
            if self._partial is not None:
                data = self._finish_partial()
                if data and data[0] == _PROTO:
                    self.discard_taken(1)
        except BrokenResourceError:
            return
        try:
            if not self._r.acquire(1.0):
                return
        except BrokenResourceError:
            return
        try:
            while available(fd):
                self._r.begin_item()
                data = read_frame_watched(fd, self._check_cut)
                self._count_taken([data])
                self._r.end_item()
                if data and data[0] == _PROTO:
                    self.discard_taken(1)
        except BrokenResourceError:  # the stream is cut: what is left cannot be read anyway
            pass
        finally:
            self._r.release()

    def _drained_after_shutdown(self) -> bool:
        """Shut down, and no item is left in the pipe or in any process's feeder (the count covers
        both): a getter that found the pipe empty can stop without waiting for the marker."""
        state = self._state
        return bool(state[_SHUTDOWN]) and (
            state[_SHUTDOWN] == _SHUT_IMMEDIATE or self._queued() <= 0
        )

    def _check_broken(self) -> None:
        pid = self._state[_BROKEN]
        if pid:
            raise broken_error(int(pid), int(self._state[_BROKEN_SIDE]))

    def _claim_record(self) -> int:
        """The index of this process's count of items handed to its feeder thread and not yet
        written, in a record claimed now (one free, or left by a dead process with nothing
        unwritten); -1 if every record belongs to a live process (those items are not recorded)."""
        state = self._state
        with self._s:
            for at in range(_FEEDERS, _FEEDERS + 2 * _FEEDER_RECORDS, 2):
                pid = int(state[at])
                if pid == self._pid:  # an earlier feeder thread of this process
                    return at + 1
                if pid == 0 or (not state[at + 1] and not _alive(pid)):
                    state[at], state[at + 1] = self._pid, 0
                    return at + 1
        return -1

    def _free_lost_items(self) -> None:
        """Free the slots and counts of items that a dead process had handed to its feeder thread
        and not written: they died with it (as :meth:`multiprocessing.Queue.put` loses them), and
        must not keep a bounded queue full, nor ``join()`` waiting, for ever."""
        state = self._state
        for at in range(_FEEDERS, _FEEDERS + 2 * _FEEDER_RECORDS, 2):
            pid = int(state[at])
            if pid == 0 or pid == self._pid or state[at + 1] <= 0 or _alive(pid):
                continue
            with self._s:
                if state[at] != pid:  # another process freed them first
                    continue
                n = int(state[at + 1])
                state[at], state[at + 1] = 0, 0
                if self._joinable:
                    state[_UNFINISHED] -= n
            self.release_room(n)

    def _check_cut(self) -> None:
        """:meth:`_check_broken`, and look whether a holder of the read or write lock died inside
        an item (a waiter calls it between two slices of its wait)."""
        _check_cut(self._state, self._r, self._w)

    def recover(self) -> bool:
        """Give back the read and write locks of processes that died holding them between two
        items, and the slots of the items they had not written; False if one died in the middle
        of an item (the stream is cut)."""
        for owned in (self._s, self._r, self._w):
            try:
                if owned.inherit():
                    owned.release()
            except BrokenResourceError:
                return False
        self._free_lost_items()
        return not self._state[_BROKEN]

    def end_stream(self, error: BaseException) -> None:
        """Put an end marker behind every item queued: each reader, in every process, hands out
        those items, then raises ``error`` (``Queue.link``, when its producers have exited)."""
        self._feed_raw(_END + dumps(error))

    def _check_shutdown(self) -> None:
        if self._state[_SHUTDOWN]:
            raise ShutDown

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    # -- joinable --

    def task_done(self) -> None:
        """Tell the queue that an item taken earlier has been processed (joinable queues only)."""
        if not self._joinable:
            raise ValueError("task_done() needs a JoinableQueue")
        with self._s:
            if self._state[_UNFINISHED] <= 0:
                raise ValueError("task_done() called more times than there were items")
            self._state[_UNFINISHED] -= 1

    def join(self, timeout: float | None = None) -> bool:
        """Block until every item put has been taken and marked done with :meth:`task_done`;
        return False if ``timeout`` passed first (joinable queues only).

        As in Python 3.13's queues, a shutdown does not end the wait by itself: an immediate one
        counts the items it discards as done, and items already handed out still need their
        :meth:`task_done`. The wait reads the shared count in short sleeps and holds no lock, so a
        process killed while it waits here leaves nothing behind. Raises
        :class:`aioipc.BrokenResourceError` if the queue's stream is cut while it waits (the items
        lost with it will never be done).
        """
        if not self._joinable:
            raise ValueError("join() needs a JoinableQueue")
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep = _JOIN_FIRST_SLEEP
        while not self.joined():
            self._check_broken()
            self._free_lost_items()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sleep = min(sleep, left)
            time.sleep(sleep)
            sleep = min(sleep * 2, POLL_SLICE)
        return True

    def joined(self) -> bool:
        """True when every item put has been marked done (joinable queues)."""
        return bool(self._state[_UNFINISHED] <= 0)

    # -- closing --

    def close(self) -> None:
        """Release this process's use of the queue: flush what it put, stop its feeder thread.

        Like :meth:`multiprocessing.Queue.close`; other processes are not affected.
        """
        if self._closed:
            return
        self._closed = True
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None
        self._reader.close()
        self._writer.close()

    def join_thread(self) -> None:
        """Kept for compatibility with :class:`multiprocessing.Queue`: :meth:`close` already
        waits for the feeder thread."""

    def cancel_join_thread(self) -> None:
        """Do not wait, when this process exits, for the feeder thread to write what this process
        put (as :meth:`multiprocessing.Queue.cancel_join_thread`): items not yet written are lost,
        but the exit cannot hang on a full pipe that nobody reads."""
        self._join_feeder_at_exit = False
        if self._feeder is not None:
            self._feeder.join_at_exit = False


__all__ = [
    "NOTHING",
    "SHUTDOWN_MARKER",
    "EndMarker",
    "SyncQueue",
    "UnpicklingFailed",
    "dumps",
    "loads",
]
