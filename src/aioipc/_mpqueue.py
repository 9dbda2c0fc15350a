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
import copyreg
import errno
import fcntl
import io
import os
import select
import struct
import sys
import termios
import threading
import time
import weakref
from collections.abc import Iterable
from multiprocessing import context, util
from multiprocessing.connection import Pipe
from multiprocessing.reduction import ForkingPickler
from typing import Any, Generic, TypeVar

from ._exceptions import Empty, Full, ShutDown

T = TypeVar("T")

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
#: A frame's body as read from the pipe.
Frame = bytes | bytearray | memoryview
#: How long a blocked call sleeps at most before it looks at the shared shutdown flag again.
POLL_SLICE = 0.05

# Shared state block: indices into a RawArray of signed 64-bit integers.
_COUNT, _SHUTDOWN, _UNFINISHED = 0, 1, 2
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
_MARK = bytes(ForkingPickler.dumps(SHUTDOWN_MARKER))


class UnpicklingFailed:
    """Stands in the item stream for an item that could not be unpickled in this process; the get
    that receives it raises the error (the queue goes on)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class EndMarker:
    """Ends the queue for every reader that reaches it, with ``error``, after the items put before
    it; a reader that takes it puts it back for the next process. Supervision sends one when the
    queue's producers are gone."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Pickling(threading.local):
    """One reusable pickler per thread: building a ForkingPickler copies the reducer tables,
    which costs more than pickling a small object. It is rebuilt when reducers were registered
    since (``copyreg.pickle``, ``ForkingPickler.register``)."""

    def __init__(self) -> None:
        self.busy = False
        self.build()

    def build(self) -> None:
        self.buffer = io.BytesIO()
        self.pickler = ForkingPickler(self.buffer)
        self.tables = _reducer_tables()


def _reducer_tables() -> tuple[int, int]:
    return len(copyreg.dispatch_table), len(getattr(ForkingPickler, "_extra_reducers", ()))


_pickling = _Pickling()


def dumps(obj: object) -> memoryview:
    """Pickle ``obj`` for another process, or raise TypeError naming its type."""
    state = _pickling
    try:
        if state.busy:  # called from inside a __reduce__ of the object being pickled
            return ForkingPickler.dumps(obj)
        if state.tables != _reducer_tables():
            state.build()
        state.busy = True
        try:
            state.pickler.dump(obj)
            return memoryview(state.buffer.getvalue())
        finally:
            state.buffer.seek(0)
            state.buffer.truncate()
            state.pickler.clear_memo()
            state.busy = False
    except Exception as exc:
        raise TypeError(
            f"cannot send a {type(obj).__module__}.{type(obj).__qualname__} object to another "
            f"process: it cannot be pickled ({type(exc).__name__}: {exc})"
        ) from exc


def loads(frame: Frame) -> Any:
    try:
        return ForkingPickler.loads(frame)
    except Exception as exc:
        return UnpicklingFailed(exc)


def frame(data: bytes | memoryview) -> list[bytes | memoryview]:
    n = len(data)
    if n > 0x7FFFFFFF:
        return [_HEADER.pack(-1), _LONG_HEADER.pack(n), data]
    return [_HEADER.pack(n), data]


#: A chunk this large is written as it is; smaller ones are joined into few ``write`` calls.
_JOIN_MAX = 16 * 1024


def write_all(fd: int, chunks: Iterable[bytes | memoryview]) -> None:
    """Write whole frames to the pipe: small chunks joined into few ``write`` calls, large ones
    written without a copy."""
    pending: list[bytes | memoryview] = []
    size = 0
    for chunk in chunks:
        if len(chunk) >= _JOIN_MAX:
            if pending:
                _write(fd, b"".join(pending))
                pending.clear()
                size = 0
            _write(fd, chunk)
            continue
        pending.append(chunk)
        size += len(chunk)
        if size >= 65536:
            _write(fd, b"".join(pending))
            pending.clear()
            size = 0
    if pending:
        _write(fd, b"".join(pending))


def _write(fd: int, buf: bytes | memoryview) -> None:
    """Write all of ``buf`` to the queue's pipe, whose write end is non-blocking: wait for room."""
    view = memoryview(buf)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


#: A frame this small is written whole or not at all by one non-blocking write (POSIX PIPE_BUF).
_ATOMIC_FRAME = getattr(select, "PIPE_BUF", 512)


#: Bytes a queue's pipe may hold once large items go through it (Linux lets an unprivileged
#: process go up to pipe-max-size, 1 MiB by default): room for several large items, so that a
#: reader takes them in one batch. Pipes count against a per-user budget (64 MiB by default), so
#: a queue's pipe grows only when the first item that would not fit the default size is put.
PIPE_SIZE = 1 << 20


def _grow_pipe(fd: int) -> None:
    """Enlarge a pipe's buffer where the platform allows it (Linux); keep the default otherwise."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        try:
            fcntl.fcntl(fd, set_size, PIPE_SIZE)
        except OSError:  # over pipe-max-size or the per-user pipe quota: the default still works
            pass


def available(fd: int) -> int:
    """Bytes waiting in a pipe or socket (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, sys.byteorder, signed=True)


def _read_into(fd: int, view: memoryview) -> None:
    """Fill ``view`` from a blocking fd."""
    while view:
        n = os.readv(fd, [view])
        if not n:
            raise OSError("got end of file during message")
        view = view[n:]


def read_exact(fd: int, n: int) -> bytes:
    """Read exactly ``n`` bytes from a blocking fd (EOFError on a clean end before any byte)."""
    chunks = []
    remaining = n
    while remaining > 0:
        chunk = os.read(fd, remaining)
        if not chunk:
            if remaining == n:
                raise EOFError
            raise OSError("got end of file during message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_size(fd: int) -> int:
    """Read a frame header from a blocking fd: the size of the body that follows."""
    (size,) = _HEADER.unpack(read_exact(fd, 4))
    if size == -1:
        (size,) = _LONG_HEADER.unpack(read_exact(fd, 8))
    return size  # type: ignore[no-any-return]


def _read_body(fd: int, size: int) -> Frame:
    if size < _JOIN_MAX:
        return read_exact(fd, size)
    body = bytearray(size)
    _read_into(fd, memoryview(body))
    return body


def read_frame(fd: int) -> Frame:
    """One whole frame, blocking until it has arrived."""
    return _read_body(fd, _read_size(fd))


#: A frame this large is read alone, straight into its own buffer (never through a batch read).
_ALONE_FRAME = 256 * 1024


def read_frames(fd: int, max_bytes: int) -> list[Frame]:
    """The frames already in the pipe (at least one byte must be there), reading at most about
    ``max_bytes``; a frame that has only partly arrived is completed (blocking), never split."""
    size = _read_size(fd)
    if size >= _ALONE_FRAME:
        return [_read_body(fd, size)]
    chunk = os.read(fd, max(min(available(fd), max_bytes), size))
    if not chunk and size:
        raise OSError("got end of file during message")
    view = memoryview(chunk)
    frames: list[Frame] = []
    pos, end = 0, len(chunk)
    while True:
        if end - pos >= size:
            frames.append(view[pos : pos + size])
            pos += size
        else:  # the rest of the frame is on its way: read it straight into one buffer
            body = bytearray(size)
            body[: end - pos] = view[pos:end]
            _read_into(fd, memoryview(body)[end - pos :])
            frames.append(body)
            pos = end
        if pos >= end:
            return frames
        if end - pos < 4:
            rest = read_exact(fd, 4 - (end - pos))
            (size,) = _HEADER.unpack(bytes(view[pos:]) + rest)
            pos = end
        else:
            (size,) = _HEADER.unpack_from(view, pos)
            pos += 4
        if size == -1:
            have = bytes(view[pos : pos + 8])
            pos = min(pos + 8, end)
            (size,) = _LONG_HEADER.unpack(
                have + read_exact(fd, 8 - len(have)) if len(have) < 8 else have
            )


class _Feeder:
    """This process's writer thread: takes pickled items from ``put`` and writes them to the pipe
    under the shared write lock, so that ``put`` never waits for room in the pipe."""

    def __init__(self, queue: SyncQueue[Any], *, join_at_exit: bool) -> None:
        self.join_at_exit = join_at_exit
        self._fd = queue._writer.fileno()
        self._wlock = queue._wlock
        self._cond = threading.Condition(threading.Lock())
        self._buffer: collections.deque[memoryview | bytes] = collections.deque()
        #: Items taken from the buffer and not yet written.
        self._inflight = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="aioipc-queue-feeder", daemon=True)
        self._thread.start()
        # Flush what this process put before it exits (multiprocessing's own queues do the same).
        self._finalizer = util.Finalize(self, _Feeder._flush, (weakref.ref(self),), exitpriority=-5)

    def __len__(self) -> int:
        return len(self._buffer)

    def discard(self) -> None:
        """Drop what was put and not yet written (an immediate shutdown)."""
        with self._cond:
            self._buffer.clear()

    def put(self, data: memoryview | bytes) -> None:
        with self._cond:
            self._buffer.append(data)
            self._cond.notify()

    def _run(self) -> None:
        cond, buffer = self._cond, self._buffer
        while True:
            with cond:
                while not buffer and not self._closing:
                    cond.wait()
                self._inflight = len(buffer)  # before the buffer empties: see idle()
                batch = list(buffer)
                buffer.clear()
                if not batch:
                    cond.notify_all()
                    return
            try:
                with self._wlock:
                    write_all(self._fd, (part for data in batch for part in frame(data)))
            except OSError as exc:  # every reader is gone: nothing can be delivered any more
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                with cond:
                    buffer.clear()
                    self._closing = True
            finally:
                self._inflight = 0

    @property
    def idle(self) -> bool:
        """Nothing this process put is waiting to be written (so a new item may overtake none)."""
        return not self._buffer and not self._inflight

    @staticmethod
    def _flush(ref: weakref.ref[_Feeder]) -> None:
        feeder = ref()
        if feeder is not None and feeder.join_at_exit:
            feeder.close(timeout=None)

    def close(self, timeout: float | None = 5.0) -> None:
        """Write what is buffered, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


_live_queues: weakref.WeakSet[SyncQueue[Any]] = weakref.WeakSet()


def _reset_queues_after_fork() -> None:
    for queue in list(_live_queues):
        queue._reset_local()


os.register_at_fork(after_in_child=_reset_queues_after_fork)


class SyncQueue(Generic[T]):
    """The blocking face of an aioipc queue, for synchronous code in any process.

    It has the methods of :class:`multiprocessing.Queue` (and, when joinable, of
    :class:`multiprocessing.JoinableQueue`), and honours :meth:`shutdown` like the async face:
    ``put`` raises :class:`aioipc.ShutDown` and ``get`` returns what is still queued, then raises
    it.
    Pass it (or the async queue that owns it) to child processes as an argument.
    """

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, joinable: bool = False) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
        if ctx is None:
            import multiprocessing

            ctx = multiprocessing.get_context()
        self._maxsize = maxsize if maxsize > 0 else 0
        self._reader, self._writer = Pipe(duplex=False)
        # Writers wait for room themselves (poll), so that a put can try a write that cannot block.
        os.set_blocking(self._writer.fileno(), False)
        self._rlock = ctx.Lock()
        self._wlock = ctx.Lock()
        self._slock = ctx.Lock()
        self._sem = ctx.BoundedSemaphore(maxsize) if maxsize > 0 else None
        self._state = ctx.RawArray("q", 3)
        self._cond = ctx.Condition(self._slock) if joinable else None
        self._joinable = joinable
        self._closed = False
        self._reset_local()

    def _reset_local(self) -> None:
        """Forget this process's threads (at creation, unpickling, and in a forked child)."""
        self._feeder: _Feeder | None = None
        self._poller: Any = None
        self._poller_fd = -1
        self._join_feeder_at_exit = True
        self._pipe_grown = False
        _live_queues.add(self)

    def __getstate__(self) -> tuple[Any, ...]:
        context.assert_spawning(self)
        return (
            self._maxsize, self._reader, self._writer, self._rlock, self._wlock, self._slock,
            self._sem, self._state, self._cond, self._joinable,
        )  # fmt: skip

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (
            self._maxsize, self._reader, self._writer, self._rlock, self._wlock, self._slock,
            self._sem, self._state, self._cond, self._joinable,
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
        ``block`` is false), :class:`aioipc.ShutDown` if the queue was shut down, ``TypeError`` if
        ``obj`` cannot be pickled, ``ValueError`` if this process closed the queue.
        """
        self._check_open()
        data = dumps(obj)
        if self._sem is not None and not self._acquire_room(block, timeout):
            raise Full
        self.feed(data)

    def put_nowait(self, obj: T) -> None:
        """Put ``obj`` without waiting; raise :class:`aioipc.Full` if a bounded queue is full."""
        self.put(obj, block=False)

    def _acquire_room(self, block: bool, timeout: float | None) -> bool:
        assert self._sem is not None
        if self._sem.acquire(False):
            return True
        if not block:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_shutdown()
            wait = POLL_SLICE if deadline is None else min(POLL_SLICE, deadline - time.monotonic())
            if wait <= 0:
                return False
            if self._sem.acquire(True, wait):
                return True

    def try_room(self) -> bool:
        """Take a slot of a bounded queue without waiting (always True when unbounded)."""
        return self._sem is None or self._sem.acquire(False)

    def release_room(self, n: int = 1) -> None:
        """Free ``n`` slots of a bounded queue (items handed out by a get)."""
        sem = self._sem
        if sem is not None:
            for _ in range(n):
                sem.release()

    def feed(self, data: memoryview | bytes) -> None:
        """Count a pickled item (whose slot is taken) as queued and hand it to the feeder."""
        with self._slock:
            if self._state[_SHUTDOWN]:
                if self._sem is not None:
                    self._sem.release()
                raise ShutDown
            self._state[_COUNT] += 1
            if self._joinable:
                self._state[_UNFINISHED] += 1
        self._feed_raw(data)

    def _feed_raw(self, data: memoryview | bytes) -> None:
        """Write a pickle to the pipe now if that cannot block, else hand it to the feeder."""
        if len(data) >= _JOIN_MAX and not self._pipe_grown:
            _grow_pipe(self._writer.fileno())
            self._pipe_grown = True
        feeder = self._feeder
        if (
            len(data) <= _ATOMIC_FRAME - 4
            and (feeder is None or feeder.idle)
            and self._wlock.acquire(False)
        ):
            try:
                os.write(self._writer.fileno(), _HEADER.pack(len(data)) + data)
                return
            except BlockingIOError:  # the pipe is full: the feeder will wait for room
                pass
            finally:
                self._wlock.release()
        if feeder is None:
            feeder = self._feeder = _Feeder(self, join_at_exit=self._join_feeder_at_exit)
        feeder.put(data)

    # -- getting --

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return an item, waiting for one if needed.

        Raises :class:`aioipc.Empty` if none arrives within ``timeout`` (or at once when ``block``
        is false), :class:`aioipc.ShutDown` once the queue is shut down and drained,
        ``ValueError`` if this process closed the queue.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self._reader.fileno()
        while True:
            if self._state[_SHUTDOWN] == _SHUT_IMMEDIATE:
                raise ShutDown
            wait = POLL_SLICE if deadline is None else min(POLL_SLICE, deadline - time.monotonic())
            if not block:
                wait = 0
            if self._rlock.acquire(block, max(wait, 0)):
                try:
                    if self._poll_readable(fd, max(wait, 0)):
                        data = read_frame(fd)
                        break
                finally:
                    self._rlock.release()
            if self._drained_after_shutdown():
                raise ShutDown
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise Empty
        items, end = self._decode([data])
        if end is not None:
            raise end
        item = items[0]
        if isinstance(item, UnpicklingFailed):
            raise item.error
        return item

    def get_nowait(self) -> T:
        """Remove and return an item if one is there; else raise :class:`aioipc.Empty`."""
        return self.get(block=False)

    def _poll_readable(self, fd: int, timeout: float) -> bool:
        if self._poller_fd != fd:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
            self._poller_fd = fd
        return bool(self._poller.poll(timeout * 1000))

    def read(
        self, max_items: int, max_bytes: int, wake_fd: int
    ) -> tuple[list[T], BaseException | None]:
        """For the bridge's reader thread: wait for items (without holding the read lock), then
        take those already there. Returns early when ``wake_fd`` is readable."""
        fd = self._reader.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        state = self._state
        while True:
            if state[_SHUTDOWN] == _SHUT_IMMEDIATE:
                return [], ShutDown()
            events = poller.poll(POLL_SLICE * 1000)
            if any(event_fd == wake_fd for event_fd, _ in events):
                return [], None
            if not events:
                if self._drained_after_shutdown():
                    return [], ShutDown()
                continue
            if not self._rlock.acquire(True, POLL_SLICE):
                continue
            try:
                if not available(fd):
                    continue  # another process took it
                if max_items == 1:
                    frames: list[Frame] = [read_frame(fd)]
                else:
                    frames = read_frames(fd, max_bytes)
            finally:
                self._rlock.release()
            # Prefetched items keep their slot of a bounded queue until a get hands them out.
            return self._decode(frames, release_room=False)

    def _decode(
        self, frames: list[Frame], *, release_room: bool = True
    ) -> tuple[list[T], BaseException | None]:
        """Unpickle frames just read; account for them; recognise the shutdown marker."""
        end: BaseException | None = None
        items = []
        mark_len = len(_MARK)
        for data in frames:
            if len(data) == mark_len and data == _MARK:
                end = ShutDown()
                self._feed_raw(_MARK)  # for the next process
            else:
                item = loads(data)
                if type(item) is EndMarker:
                    end = item.error
                    self._feed_raw(bytes(data))  # for the next process
                else:
                    items.append(item)
        if items:
            with self._slock:
                self._state[_COUNT] -= len(items)
        immediate = self._state[_SHUTDOWN] == _SHUT_IMMEDIATE
        if items and (release_room or immediate):
            self.release_room(len(items))
        if immediate:
            return [], ShutDown()
        return items, end

    def giveback(self, items: list[T]) -> None:
        """Put items taken by this process back into the queue (at its end)."""
        for item in items:
            with self._slock:
                self._state[_COUNT] += 1
            self._feed_raw(dumps(item))

    # -- size --

    def qsize(self) -> int:
        """The number of items put and not yet taken by any process (approximate while others
        put and get). Works on every platform, macOS included. 0 after an immediate shutdown."""
        if self._state[_SHUTDOWN] == _SHUT_IMMEDIATE:
            return 0
        return max(int(self._state[_COUNT]), 0)

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

    def shutdown(self, immediate: bool = False) -> None:
        """Shut the queue down for every process.

        Afterwards ``put`` raises :class:`aioipc.ShutDown` everywhere and ``get`` returns the items
        still queued, then raises it. With ``immediate=True`` the queued items are discarded and
        every waiter wakes at once. Calling it again is harmless (and can upgrade to immediate).
        """
        with self._slock:
            previous = self._state[_SHUTDOWN]
            self._state[_SHUTDOWN] = _SHUT_IMMEDIATE if immediate else max(previous, _SHUT_GRACEFUL)
            if self._cond is not None:
                self._cond.notify_all()
        if immediate:
            self._discard_queued()
        if not previous:
            self._feed_raw(_MARK)

    def _discard_queued(self) -> None:
        if self._feeder is not None:
            self._feeder.discard()
        fd = self._reader.fileno()
        if not self._rlock.acquire(True, 1.0):
            return
        try:
            while available(fd):
                frames = read_frames(fd, 1 << 20)
                real = sum(1 for f in frames if not (len(f) == len(_MARK) and f == _MARK))
                with self._slock:
                    self._state[_COUNT] -= real
                    if self._joinable:
                        self._state[_UNFINISHED] -= real
                self.release_room(real)
        finally:
            self._rlock.release()
        if self._cond is not None:
            with self._cond:
                self._cond.notify_all()

    def _drained_after_shutdown(self) -> bool:
        """Shut down, and no item is left in the pipe or in any process's feeder (the count covers
        both): a getter that found the pipe empty can stop without waiting for the marker."""
        state = self._state
        return bool(state[_SHUTDOWN]) and (
            state[_SHUTDOWN] == _SHUT_IMMEDIATE or state[_COUNT] <= 0
        )

    def _check_shutdown(self) -> None:
        if self._state[_SHUTDOWN]:
            raise ShutDown

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    # -- joinable --

    def task_done(self) -> None:
        """Tell the queue that an item taken earlier has been processed (joinable queues only)."""
        if self._cond is None:
            raise ValueError("task_done() needs a JoinableQueue")
        with self._cond:
            if self._state[_UNFINISHED] <= 0:
                raise ValueError("task_done() called more times than there were items")
            self._state[_UNFINISHED] -= 1
            if self._state[_UNFINISHED] == 0:
                self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Block until every item put has been taken and marked done, or the queue is shut down
        and drained; return False if ``timeout`` passed first (joinable queues only)."""
        if self._cond is None:
            raise ValueError("join() needs a JoinableQueue")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._joined():
                wait = POLL_SLICE if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    return False
                self._cond.wait(min(wait, POLL_SLICE))
        return True

    def _joined(self) -> bool:
        state = self._state
        shutdown = state[_SHUTDOWN]
        return bool(
            state[_UNFINISHED] <= 0
            or shutdown == _SHUT_IMMEDIATE
            or (shutdown == _SHUT_GRACEFUL and state[_COUNT] <= 0)
        )

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
    "SHUTDOWN_MARKER",
    "EndMarker",
    "SyncQueue",
    "UnpicklingFailed",
    "dumps",
    "loads",
]
