"""``aioipc.Connection`` and ``aioipc.Pipe``; ``aioipc.connect`` and ``aioipc.listen`` across hosts.

A :class:`Connection` is the async face of a :class:`multiprocessing.connection.Connection`: the
same file descriptor, the same frames on the wire (a 4-byte big-endian length, or -1 and an 8-byte
length, then the payload), so either end may be a plain multiprocessing peer.

Receiving. On Linux the event loop itself waits: each connection end has a private ``epoll`` fd
that watches the connection's fd, and the loop waits for *that* fd to become readable, so the loop
never switches the connection's fd to non-blocking mode (which would break synchronous users of
``.sync``). The loop then reads what is already there with a read that cannot wait (``RWF_NOWAIT``;
``FIONREAD`` first on kernels that refuse it) and never waits for the rest of a message: whole
frames are handed out, a frame that has partly arrived stays in this process's receive state. A
message larger than :data:`LOOP_MESSAGE_MAX` is finished by the bridge's reader thread, so that
reading and copying a large body stay off the loop. Elsewhere the reader thread does all the
reading. Receivers of one connection end take turns, first come first served.

Sending. A small frame (up to ``PIPE_BUF`` bytes, header included) is written on the loop thread
when that cannot block: with ``RWF_NOWAIT`` where such a write is all or nothing (a pipe; a Unix
socket), otherwise once the fd polls writable, which on Linux leaves room for it (a pipe has a free
page; a TCP socket at least a third of its send buffer). Every other send goes to the bridge's
writer thread, which waits for room, then writes the whole frame. Sends keep their order.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import hmac
import ipaddress
import logging
import math
import multiprocessing
import multiprocessing.connection as mpc
import os
import select
import socket
import stat
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from multiprocessing import AuthenticationError, context
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler
from typing import Any, Generic, TypeVar

from . import _fork
from ._bridge import Job, Reader, Writer
from ._exceptions import BrokenResourceError, BusyResourceError, ClosedResourceError
from ._loops import Checkpointer, FdWatch, Waiter, current_loop
from ._resource import AsyncResource
from ._wire import HEADER, LONG_HEADER, PIPE_BUF, POLL_SLICE, READ_CHUNK, Wire, dumps, write_frame

SendT = TypeVar("SendT")
RecvT = TypeVar("RecvT")


_HEADER = HEADER
_LONG_HEADER = LONG_HEADER

#: Frames up to this size (header included) may be written on the event loop's thread.
INLINE_SEND_MAX = PIPE_BUF
#: Messages up to this size are assembled on the loop; larger ones by the reader thread.
LOOP_MESSAGE_MAX = 256 * 1024

_HAVE_READINESS = hasattr(select, "epoll") and hasattr(os, "eventfd")
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: Whether reads and writes may pass RWF_NOWAIT (Linux 4.14+ for the flag; pipes and sockets take
#: it on recent kernels). Turned off at the first refusal.
_nowait_writes = bool(_RWF_NOWAIT)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0)

#: A handshake must finish within this many seconds (the whole of it, from the accept).
HANDSHAKE_TIMEOUT = 10.0
#: At most this many handshakes in progress per listener, by default.
MAX_HANDSHAKES = 128


# --------------------------------------------------------------------------------------------
# Receiving state
# --------------------------------------------------------------------------------------------


class _WireSource:
    """The reader thread's view of a connection end (a :class:`aioipc._bridge.Source`)."""

    def __init__(self, wire: Wire, *, hand_back: bool) -> None:
        self._wire = wire
        self._hand_back = hand_back
        #: Frames returned to the reader so far (counted before they reach its buffer).
        self.handed_out = 0
        self._poller: Any = None
        self._poller_wake = -1

    def read(
        self, max_items: int, max_bytes: int, wake_fd: int
    ) -> tuple[list[bytes], BaseException | None]:
        wire = self._wire
        if self._poller_wake != wake_fd:
            self._poller = select.poll()
            self._poller.register(wire.fd, select.POLLIN | _POLLRDHUP)
            self._poller.register(wake_fd, select.POLLIN)
            self._poller_wake = wake_fd
        while not wire.frames and wire.end is None:
            events = self._poller.poll()
            if any(fd == wake_fd for fd, _ in events):
                return [], None
            wire.ingest(max_bytes, wait=True)
        frames = list(wire.frames)
        wire.frames.clear()
        self.handed_out += len(frames)
        if self._hand_back and not wire.in_message:
            wire.thread_owned = False
        return frames, wire.end

    def close(self) -> None:
        """Nothing to release: the connection owns the fd."""


class _Turns:
    """The receivers of one connection end take turns, first come first served.

    They all wait on one event loop at a time (the fd's readiness can be awaited by one task
    only); a receiver on another thread's loop while the turns are taken gets
    :class:`aioipc.BusyResourceError`.
    """

    __slots__ = ("_thread", "_waiters", "busy")

    def __init__(self) -> None:
        self.busy = False
        self._thread = 0
        self._waiters: deque[Waiter] = deque()

    async def acquire(self) -> None:
        if not self.busy:
            self.busy = True
            self._thread = threading.get_ident()
            return
        if threading.get_ident() != self._thread:
            raise BusyResourceError(
                "this connection end is being received from on another thread's event loop: "
                "one end is received from on one event loop at a time"
            )
        loop = current_loop()
        waiter = Waiter(loop, 1)
        self._waiters.append(waiter)
        try:
            await loop.park(waiter, self._abort)
        except BaseException:
            if waiter.items is not None:  # the turn was given to us: pass it on
                self.release()
            else:
                waiter.dead = True
            raise

    @staticmethod
    def _abort(waiter: Waiter) -> None:
        waiter.dead = True

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.dead:
                waiter.items = []
                waiter.loop.wake(waiter)
                return
        self.busy = False


# --------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionStatistics:
    """A snapshot of one connection end, as seen from the calling process
    (``Connection.statistics()``)."""

    #: Coroutines of this process waiting in ``recv()``/``recv_bytes()``.
    waiting_receivers: int
    #: Coroutines of this process waiting in ``send()``/``send_bytes()`` for their turn or for room.
    waiting_senders: int
    #: Messages this process has received and not handed out yet.
    buffered: int
    #: aioipc threads of this connection end running in this process.
    threads: int


_live_connections: weakref.WeakSet[Connection[Any, Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for connection in list(_live_connections):
        if not connection._closed:
            connection._after_fork()


_fork.register(_after_fork_in_child)


class Connection(AsyncResource, Generic[SendT, RecvT]):
    """One end of a connection between processes, with async ``send``/``recv`` and the blocking
    :class:`multiprocessing.connection.Connection` as :attr:`sync`.

    Make a pair with :func:`aioipc.Pipe`, adopt any multiprocessing connection with :meth:`wrap`,
    or get one across hosts from :func:`aioipc.connect` or ``Listener.accept()``. It pickles into
    child processes started with spawn or forkserver (pass it as an argument) and is inherited under
    fork; there it works synchronously through :attr:`sync`, or asynchronously with the child's own
    event loop. The peer may be a plain multiprocessing connection: the bytes on the wire are the
    same.

    ``Connection[SendT, RecvT]`` types what :meth:`send` takes and :meth:`recv` returns.

    **End of file**: :meth:`recv` raises ``EOFError`` (and ``async for`` ends) once *every* copy of
    the other end is closed, in every process, or its processes died. A child process holds copies
    of the ends it was given, and under fork of every end the parent had: after starting a child,
    the parent must close its own copy of the child's end (and a forked child the copies it does not
    use), or EOF never arrives::

        parent_end, child_end = aioipc.Pipe()
        process = multiprocessing.Process(target=work, args=(child_end,))
        process.start()
        child_end.close()  # without this, parent_end never sees EOF
    """

    def __init__(
        self, conn: mpc.Connection, *, _owner: bool = True, _readiness: bool | None = None
    ) -> None:
        if not isinstance(conn, mpc.Connection):
            raise TypeError(
                f"expected a multiprocessing.connection.Connection, not {type(conn).__name__}"
            )
        if conn.closed:
            raise ValueError("the multiprocessing connection is closed")
        self._conn = conn
        self._fd = conn.fileno()
        self._readiness = _HAVE_READINESS if _readiness is None else _readiness
        self._can_recv = bool(conn.readable)
        self._can_send = bool(conn.writable)
        self._closed = False
        self._owner_pid = os.getpid() if _owner else -1
        self._reset_local()

    def _reset_local(self) -> None:
        """Per-process state, rebuilt in a forked child: what this process read, its threads."""
        self._lock = threading.Lock()
        self._wire = Wire(self._fd, thread_owned=not self._readiness)
        self._source = _WireSource(self._wire, hand_back=self._readiness)
        self._reader: Reader[bytes] = Reader(self._source, name="connection", prefetch=0)
        self._writer = Writer("connection")
        self._turns = _Turns()
        self._taken = 0  # frames taken from the reader thread
        self._receiving = 0
        self._checkpoints = Checkpointer()
        self._in_poller = select.poll()
        self._in_poller.register(self._fd, select.POLLIN | _POLLRDHUP)
        self._atomic_nowait: bool | None = None
        self._out_poller = select.poll()
        self._out_poller.register(self._fd, select.POLLOUT)
        self._epoll: Any = None
        self._closing_fd = -1
        self._waiting = False
        self._watch: FdWatch | None = None
        _live_connections.add(self)

    def _after_fork(self) -> None:
        if self._epoll is not None:  # the parent's: close this process's copies only
            self._epoll.close()
            os.close(self._closing_fd)
        self._reset_local()

    @classmethod
    def wrap(cls, conn: mpc.Connection) -> Connection[Any, Any]:
        """Adopt a :class:`multiprocessing.connection.Connection` (from ``multiprocessing.Pipe``,
        a ``Listener`` or ``Client``...). The result owns it: :meth:`close` closes it. Until then
        it stays usable synchronously as :attr:`sync` (while no coroutine receives from it)."""
        obj: object = conn
        if isinstance(obj, Connection):
            raise TypeError("this is an aioipc connection already; use it as it is")
        return cls(conn)

    def __getstate__(self) -> mpc.Connection:
        context.assert_spawning(self)
        return self._conn

    def __setstate__(self, conn: mpc.Connection) -> None:
        self.__init__(conn, _owner=False)  # type: ignore[misc]

    def __repr__(self) -> str:
        if self._closed:
            return f"<aioipc.Connection closed at {id(self):#x}>"
        mode = "".join(
            name
            for name, on in ((" readable", self._conn.readable), (" writable", self._conn.writable))
            if on
        )
        return f"<aioipc.Connection fd={self._fd}{mode} at {id(self):#x}>"

    # -- properties --

    @property
    def sync(self) -> mpc.Connection:
        """The :class:`multiprocessing.connection.Connection`, for synchronous code.

        Do not receive from it while coroutines of this process receive from this connection, and
        mind that messages this process has already read for them are not visible there.
        """
        return self._conn

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called in this process."""
        return self._closed

    @property
    def readable(self) -> bool:
        """True if this end can receive (False for the sending end of ``Pipe(duplex=False)``)."""
        return bool(self._conn.readable)

    @property
    def writable(self) -> bool:
        """True if this end can send (False for the receiving end of ``Pipe(duplex=False)``)."""
        return bool(self._conn.writable)

    def fileno(self) -> int:
        """The file descriptor of the connection."""
        self._check_open()
        return self._fd

    # -- sending --

    async def send(self, obj: SendT) -> None:
        """Send a picklable object to the other end.

        ``obj`` is pickled here: an object that cannot be pickled raises ``TypeError`` (naming its
        type) at this call, and the connection stays usable. Raises
        :class:`aioipc.BrokenResourceError` if the other end is gone (every copy closed, or its
        process died), :class:`aioipc.ClosedResourceError` after ``close()``, also when
        ``close()`` comes while it waits for room (the message was not sent). It never blocks the
        event loop, however large the message and however full the pipe.

        **Cancellation**: a message is sent whole or not at all. Cancelled while waiting for room
        (or for earlier sends), it was not sent. Once it has started, it is finished in the
        background even if the caller is cancelled.
        """
        if self._closed or not self._can_send:
            self._check_writable()
        if self._checkpoints.due():  # before sending: a send cancelled here was not sent
            await self._checkpoints.checkpoint()
        await self._send(dumps(obj), owned=True)

    async def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send bytes from a bytes-like object: ``size`` bytes (default: all) from ``offset``.

        The other end receives them with :meth:`recv_bytes` (or multiprocessing's
        ``recv_bytes()``). Raises ``ValueError`` for an offset or size outside the buffer, and
        otherwise as :meth:`send`.

        **Cancellation**: as :meth:`send`. A message that cannot be written at once is copied
        first (unless ``buf`` is ``bytes``), so the caller may reuse its buffer when this returns
        or is cancelled.
        """
        self._check_writable()
        view = memoryview(buf)
        if view.itemsize > 1:
            view = view.cast("B")
        n = view.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        if self._checkpoints.due():
            await self._checkpoints.checkpoint()
        await self._send(view[offset : offset + size], owned=isinstance(buf, bytes))

    async def _send(self, data: memoryview, *, owned: bool) -> None:
        """Send now if that cannot block, else through the writer thread; the other end gone is
        :class:`aioipc.BrokenResourceError`, whichever way the send went."""
        try:
            if not self._send_now(data):
                await self._send_queued(data, owned=owned)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BrokenResourceError(
                f"the other end of the connection is gone ({exc.strerror})"
            ) from None

    async def _send_queued(self, data: memoryview, *, owned: bool) -> None:
        """Send through the writer thread, after the sends queued before."""
        n = len(data)
        header = _HEADER.pack(n) if n <= 0x7FFFFFFF else _HEADER.pack(-1) + _LONG_HEADER.pack(n)
        payload = data if owned else memoryview(bytes(data))
        await self._writer.run(lambda job: self._send_waiting(job, header, payload))

    def _send_now(self, data: memoryview) -> bool:
        """Write a small message on this thread if that cannot block; False if it must wait (it is
        too large, earlier sends wait, or there is no room)."""
        global _nowait_writes
        if len(data) > INLINE_SEND_MAX - _HEADER.size or self._writer.busy:
            return False
        header = _HEADER.pack(len(data))
        with self._lock:
            if self._closed:
                self._check_open()
            fd = self._fd
            if self._atomic_nowait is None:
                self._atomic_nowait = _small_writes_are_atomic(fd)
            if self._atomic_nowait and _nowait_writes:
                try:
                    written = os.pwritev(fd, [header, data], -1, _RWF_NOWAIT)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    _nowait_writes = False  # an older kernel: poll for room first
                else:
                    if written < len(header) + len(data):  # not on Linux, which writes all or none
                        write_frame(fd, [header, data], written)
                    return True
            if not self._out_poller.poll(0):
                return False
            os.write(fd, header + data)
            return True

    def _send_waiting(self, job: Job[None], header: bytes, payload: memoryview) -> None:
        """In the writer thread: wait for room, then write the frame.

        A job given up before its frame started (the caller was cancelled, or this end closed)
        raises :class:`aioipc.ClosedResourceError`: whoever still waits for it learns that nothing
        was sent (a cancelled caller is gone and never sees it).
        """
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while not poller.poll(POLL_SLICE * 1000):
            if job.abandoned:
                raise self._not_sent()
        with self._lock:
            if not job.commit():
                raise self._not_sent()
            fd = os.dup(self._fd)  # close() may close ours while this frame is being written
        try:
            write_frame(fd, [header, payload])
        finally:
            os.close(fd)

    def _not_sent(self) -> ClosedResourceError:
        return ClosedResourceError(f"{self!r} was closed before the message could be sent")

    # -- receiving --

    async def recv(self) -> RecvT:
        """Receive the next object sent by the other end, waiting for it.

        Raises ``EOFError`` once every copy of the other end is closed (see the class docstring) or
        its process died, :class:`aioipc.ClosedResourceError` after ``close()`` (also when it is
        closed while waiting), and the unpickling error of a message that cannot be rebuilt here
        (that message is consumed; the connection goes on).

        **Cancellation**: a cancelled ``recv()`` loses nothing. A message is never left half-read:
        what has arrived of it stays in this process for the next ``recv()``.
        """
        return ForkingPickler.loads(await self._recv_frame())  # type: ignore[no-any-return]

    async def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive the next message sent with :meth:`send_bytes` (or any message, as bytes).

        If ``maxlength`` is given and the message is longer, raises ``OSError`` as multiprocessing
        does; the message is discarded and, unlike multiprocessing's, the connection stays readable.
        Otherwise raises as :meth:`recv`.

        **Cancellation**: as :meth:`recv`.
        """
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        frame = await self._recv_frame()
        if maxlength is not None and len(frame) > maxlength:
            raise OSError(
                f"bad message length: {len(frame)} bytes, more than maxlength={maxlength}"
            )
        return frame

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if a message (or the end of the stream) is there to receive.

        With a ``timeout`` (seconds; ``None``: no limit) it blocks the calling thread until then,
        as multiprocessing's ``poll`` does: in a coroutine keep the default 0, or await
        :meth:`recv` under a timeout instead.
        """
        self._check_readable()
        wire = self._wire
        if self._reader.buffer or self._source.handed_out != self._taken or wire.frames:
            return True
        if wire.end is not None or wire.in_message:  # the end, or a message that began to arrive
            return True
        return bool(self._in_poller.poll(None if timeout is None else max(timeout, 0.0) * 1000))

    async def _recv_frame(self) -> bytes:
        if self._checkpoints.due():
            await self._checkpoints.checkpoint()
        if self._closed or not self._can_recv:
            self._check_readable()
        tried = False
        if self._readiness:
            if not self._turns.busy:
                frame = self._recv_now()
                if frame is not None:
                    return frame
                tried = True  # and the turn is free: wait at once
        else:
            try:
                frame = self._reader.take_nowait()
            except IndexError:
                pass
            else:
                self._taken += 1
                return frame
        self._receiving += 1
        try:
            if not self._readiness:
                return await self._take_from_thread()
            await self._turns.acquire()
            try:
                return await self._recv_waiting(tried)
            finally:
                self._turns.release()
        finally:
            self._receiving -= 1

    def _thread_has_wire(self) -> bool:
        """True while the reader thread owns the receive state, or holds frames it read that this
        process has not taken yet: the loop side must then take from the reader."""
        return self._wire.thread_owned or self._source.handed_out != self._taken

    def _recv_now(self) -> bytes | None:
        """A frame already read or readable now, taken on the loop side without waiting; None if
        there is none yet or the reader thread has the receive state."""
        wire = self._wire
        if wire.thread_owned or self._source.handed_out != self._taken:
            return None
        frames = wire.frames
        with self._lock:
            if self._closed:
                self._check_open()
            while not frames and wire.end is None:
                if wire.message_size > LOOP_MESSAGE_MAX:
                    wire.thread_owned = True  # the reader thread finishes this message
                    return None
                if not wire.ingest(READ_CHUNK, wait=False):
                    return None
            if frames:
                return frames.popleft()
            assert wire.end is not None
            raise copy.copy(wire.end)

    async def _recv_waiting(self, tried: bool) -> bytes:
        """In this receiver's turn: wait for a frame (``tried``: nothing was there just now)."""
        while True:
            if not tried:
                frame = self._recv_now()
                if frame is not None:
                    return frame
            tried = False
            if self._thread_has_wire():
                return await self._take_from_thread()
            await self._wait_readable()
            self._checkpoints.reset()

    async def _take_from_thread(self) -> bytes:
        frame = (await self._reader.take(1))[0]
        self._taken += 1
        return frame

    async def _wait_readable(self) -> None:
        """Wait until the connection's fd is readable, or this end is closed.

        The loop watches the private epoll fd (:class:`FdWatch`: on asyncio the watch stays
        registered between waits; when the fd becomes readable while nobody waits on that loop,
        :meth:`_on_idle_readable` removes it, so data arriving between waits costs one wake-up at
        most).
        """
        with self._lock:
            self._check_open()
            if self._watch is None:
                self._epoll = select.epoll()
                self._closing_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._epoll.register(self._fd, select.EPOLLIN | _EPOLLRDHUP)
                self._epoll.register(self._closing_fd, select.EPOLLIN)
                self._watch = FdWatch(self._epoll.fileno(), self._on_idle_readable)
            self._waiting = True
            watch = self._watch
        try:
            await watch.wait()
        finally:
            with self._lock:
                self._waiting = False
                if self._closed:
                    self._close_epoll()

    def _on_idle_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread: the watched fd is readable (or this end was closed) and nobody
        waits on this loop: stop watching, or the loop would spin."""
        with self._lock:
            if self._watch is not None:
                self._watch.stop(loop)
            if self._closed:
                self._close_epoll()

    def _close_epoll(self) -> None:
        """Close the epoll fd of a closed end once no loop watches it (lock held)."""
        if self._watch is None or self._waiting:
            return
        if not self._watch.release():
            return  # the closing eventfd wakes the watch there, which closes it
        self._watch = None
        self._epoll.close()
        os.close(self._closing_fd)
        self._epoll = None
        self._closing_fd = -1

    def __aiter__(self) -> AsyncIterator[RecvT]:
        return self

    async def __anext__(self) -> RecvT:
        try:
            return await self.recv()
        except EOFError:
            raise StopAsyncIteration from None

    # -- closing --

    def close(self) -> None:
        """Close this process's copy of the connection end. Idempotent, never blocks for long.

        Coroutines waiting on it are woken with :class:`aioipc.ClosedResourceError`, later calls
        raise it. Messages this process received and did not hand out are discarded. A send that
        has started is finished in the background. The other end sees EOF once every copy of this
        end is closed.
        """
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._reader.close()
        with self._lock:
            if self._epoll is not None:
                os.eventfd_write(self._closing_fd, 1)  # wakes a waiter, and the loop's watch
                self._close_epoll()
            self._conn.close()

    def _check_readable(self) -> None:
        self._check_open()
        if not self._conn.readable:
            raise OSError("connection is write-only")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._conn.writable:
            raise OSError("connection is read-only")

    def statistics(self) -> ConnectionStatistics:
        """A snapshot of this connection end as seen from this process."""
        reader, writer = self._reader.statistics(), self._writer.statistics()
        return ConnectionStatistics(
            waiting_receivers=self._receiving,
            waiting_senders=writer["waiting"],
            buffered=len(self._wire.frames) + reader["buffered"],
            threads=reader["threads"] + writer["threads"],
        )


def _small_writes_are_atomic(fd: int) -> bool:
    """True if a write of up to ``INLINE_SEND_MAX`` bytes to ``fd`` is all or nothing: a pipe
    (``PIPE_BUF``), or a Unix socket whose send buffer takes it as one packet."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        return True
    if not stat.S_ISSOCK(mode):
        return False
    sock = socket.socket(fileno=fd)
    try:
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        return sock.family == socket.AF_UNIX and sndbuf >= 2 * (INLINE_SEND_MAX + 64)
    finally:
        sock.detach()


def Pipe(
    duplex: bool = True, *, ctx: BaseContext | None = None
) -> tuple[Connection[Any, Any], Connection[Any, Any]]:
    """A pair of connected :class:`Connection` ends, like :func:`multiprocessing.Pipe`.

    With ``duplex=True`` (the default) both ends send and receive. With ``duplex=False`` the first
    end only receives and the second only sends: ``(receiving end, sending end)``. ``ctx`` is the
    multiprocessing context (default: multiprocessing's default context).

    Build the pair before starting the processes that use it, pass an end to each, and close in
    each process the copies it does not use: EOF reaches one end only once every copy of the other
    end is closed (see :class:`Connection`).
    """
    if not isinstance(duplex, bool):
        raise TypeError(f"duplex must be a bool, not {type(duplex).__name__} {duplex!r}")
    if ctx is None:
        ctx = multiprocessing.get_context()
    elif not isinstance(ctx, BaseContext):
        raise TypeError(
            "ctx must be a multiprocessing context (multiprocessing.get_context(...)), not "
            f"{type(ctx).__name__} {ctx!r}"
        )
    a, b = ctx.Pipe(duplex)
    return Connection(a), Connection(b)


# --------------------------------------------------------------------------------------------
# Across hosts: multiprocessing's Listener and Client, with an async face
# --------------------------------------------------------------------------------------------

_logger = logging.getLogger("aioipc")

#: The handshake messages of multiprocessing's challenge (its wire format, so that plain
#: multiprocessing peers interoperate).
_CHALLENGE = b"#CHALLENGE#"
_WELCOME = b"#WELCOME#"
_FAILURE = b"#FAILURE#"
#: The digests a peer may name, as multiprocessing allows them; ours challenge with the first.
_DIGESTS = ("sha256", "sha384", "sha3_256", "sha3_384", "md5")
#: The lengths of an unprefixed (legacy HMAC-MD5) challenge or response.
_LEGACY_LENGTHS = (16, 20)

#: An accept() failure of this kind means the process or the system is short of a resource: the
#: listener logs it, stops accepting for a while (doubling up to ACCEPT_BACKOFF_MAX) and retries.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: An accept() failure of this kind concerns one peer only (it aborted, or its network failed):
#: logged at DEBUG level and retried at once, so that no peer can slow the accepting down.
_PEER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETDOWN",
        "ENETUNREACH",
        "EPERM",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
#: Authenticated peers a listener holds for accept() calls to come. Until that many wait, its
#: thread goes on accepting peers and driving handshakes (deadlines included) even while no
#: accept() is waiting; beyond it, new peers wait in the socket's backlog.
ACCEPT_AHEAD = 16
#: Peers accepted in one go before the handshakes in progress get their turn.
_ACCEPT_BATCH = 64


class InsecureListenerWarning(UserWarning):
    """Warned when a listener takes peers without an authkey (``insecure=True``) on an address
    beyond the loopback interface: any host that reaches it may send messages, which are
    unpickled, which runs code. Silence it with :func:`warnings.filterwarnings` if the network is
    trusted."""


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")
    return float(value)


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")
    return value


def _needs_authkey(address: Any, family: str | None) -> bool:
    """True unless the address is a Unix socket in the file system (guarded by its permissions)."""
    family = family or mpc.address_type(address)  # type: ignore[attr-defined]
    if family != "AF_UNIX":
        return True
    return bool(isinstance(address, (str, bytes)) and address[:1] in ("\0", b"\0"))


def _check_authkey(address: Any, family: str | None, authkey: object, insecure: object) -> None:
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
    if authkey == b"":
        raise ValueError(
            "authkey=b'' is refused: a peer that knows the empty key authenticates, so it would "
            "let anyone in. Use a long random key, e.g. os.urandom(32)"
        )
    if not isinstance(insecure, bool):
        raise TypeError(f"insecure must be a bool, not {type(insecure).__name__} {insecure!r}")
    if authkey is None and not insecure and _needs_authkey(address, family):
        raise ValueError(
            f"an authkey is required for {address!r}: a peer's messages are unpickled, which runs "
            "code, so only authenticated peers may connect. Pass authkey=..., or insecure=True to "
            "accept any peer that can reach the address"
        )


def _beyond_loopback(address: Any) -> bool:
    """True if a bound address is reachable from other hosts: an IP address that is not loopback
    (``0.0.0.0`` included)."""
    if not isinstance(address, tuple):
        return False  # a Unix socket (a path, or the abstract namespace): this host only
    try:
        return not ipaddress.ip_address(str(address[0]).partition("%")[0]).is_loopback
    except ValueError:
        return True


# -- the handshake: multiprocessing's mutual challenge, one step at a time --


def _digest_and_mac(message: bytes) -> tuple[str, bytes]:
    """The digest a challenge or response names, and the rest; ("md5", message) for the unprefixed
    (legacy) form."""
    if len(message) in _LEGACY_LENGTHS:
        return "md5", message
    if message[:1] == b"{":
        end = message.find(b"}", 1, 2 + max(map(len, _DIGESTS)))
        name = message[1:end].decode("ascii", "replace") if end > 0 else ""
        if name in _DIGESTS:
            return name, message[end + 1 :]
    raise AuthenticationError(
        "the peer does not speak multiprocessing's handshake: a message of "
        f"{len(message)} bytes with no known digest"
    )


def _verify(authkey: bytes, challenge: bytes, response: bytes) -> bool:
    name, mac = _digest_and_mac(response)
    try:
        expected = hmac.new(authkey, challenge, name).digest()
    except ValueError:  # a digest this interpreter lacks (MD5 under FIPS)
        return False
    return hmac.compare_digest(expected, mac)


def _respond(authkey: bytes, challenge: bytes) -> bytes:
    name, _ = _digest_and_mac(challenge)
    mac = hmac.new(authkey, challenge, name).digest()
    if len(challenge) in _LEGACY_LENGTHS:
        return mac
    return b"{%s}%s" % (name.encode("ascii"), mac)


#: A handshake's steps: it yields a message to send, or None to receive one (sent back to it).
_Steps = Generator["bytes | None", bytes, None]


def _challenge_peer(authkey: bytes) -> _Steps:
    challenge = b"{%s}%s" % (_DIGESTS[0].encode("ascii"), os.urandom(40))
    yield _CHALLENGE + challenge
    response = yield None
    if not _verify(authkey, challenge, response):
        yield _FAILURE
        raise AuthenticationError("the peer's digest was wrong: it does not know the authkey")
    yield _WELCOME


def _answer_peer(authkey: bytes) -> _Steps:
    message = yield None
    if not message.startswith(_CHALLENGE):
        raise AuthenticationError("the peer does not speak multiprocessing's handshake")
    yield _respond(authkey, message[len(_CHALLENGE) :])
    if (yield None) != _WELCOME:
        raise AuthenticationError("the peer rejected our digest: it uses another authkey")


def _server_steps(authkey: bytes) -> _Steps:
    yield from _challenge_peer(authkey)
    yield from _answer_peer(authkey)


def _client_steps(authkey: bytes) -> _Steps:
    yield from _answer_peer(authkey)
    yield from _challenge_peer(authkey)


#: The largest handshake message accepted. multiprocessing's are under 100 bytes, and it refuses
#: more than 256 too; a larger announced length is refused at once, before reading any of it.
HANDSHAKE_MESSAGE_MAX = 256


class _Handshake:
    """One handshake on a non-blocking fd, driven by readiness: what it has read of the message it
    waits for and what it has still to send. Reads never go past the current message, so that
    whatever the peer sends after the handshake stays in the socket for the connection."""

    __slots__ = (
        "_error",
        "_in",
        "_out",
        "_size",
        "_steps",
        "deadline",
        "done",
        "fd",
        "peer",
        "received",
    )

    def __init__(self, fd: int, steps: _Steps, deadline: float, peer: object) -> None:
        self.fd = fd
        self.deadline = deadline
        self.peer = peer
        self.done = False
        #: Messages received so far. On the listener's side, one means the peer answered the
        #: challenge right: it knows the key (a wrong answer ends the handshake at once).
        self.received = 0
        self._steps = steps
        self._out = b""
        self._in = bytearray()
        self._size = -1  # the length of the message being read; -1: its header is being read
        self._error: BaseException | None = None
        self._advance(None)

    @property
    def events(self) -> int:
        """What to poll for."""
        return select.POLLOUT if self._out else select.POLLIN | _POLLRDHUP

    def _advance(self, message: bytes | None) -> None:
        """Run the steps until they wait for a message (queueing what they send)."""
        try:
            step = next(self._steps) if message is None else self._steps.send(message)
            while step is not None:
                self._out += _HEADER.pack(len(step)) + step
                step = self._steps.send(b"")
        except StopIteration:
            self.done = True
        except Exception as exc:  # raised by run(), once what was queued is sent
            self._error = exc

    def run(self) -> bool:
        """Do the I/O that can be done now; True once the handshake succeeded and all is sent.

        Raises ``multiprocessing.AuthenticationError`` (wrong key, not multiprocessing's
        handshake, a message too large), ``ConnectionResetError`` (the peer closed) or another
        ``OSError``.
        """
        try:
            while True:
                if self._out:
                    n = os.write(self.fd, self._out)
                    self._out = self._out[n:]
                elif self._error is not None:
                    error, self._error = self._error, None
                    try:
                        raise error
                    finally:
                        del error  # no cycle: this frame, the exception, its traceback
                elif self.done:
                    return True
                else:
                    self._read()
        except BlockingIOError:
            return False

    def _read(self) -> None:
        want = (4 if self._size < 0 else self._size) - len(self._in)
        if want:
            data = os.read(self.fd, want)
            if not data:
                raise ConnectionResetError(
                    errno.ECONNRESET, "the peer closed the connection during the handshake"
                )
            self._in += data
            if len(data) < want:
                return
        if self._size < 0:
            (size,) = _HEADER.unpack(self._in)
            if not 0 <= size <= HANDSHAKE_MESSAGE_MAX:
                raise AuthenticationError(
                    f"the peer announced a handshake message of {size} bytes: refused, at most "
                    f"{HANDSHAKE_MESSAGE_MAX} are allowed"
                )
            self._size = size
            self._in = bytearray()
            if size:
                return
        message = bytes(self._in)
        self._size = -1
        self._in = bytearray()
        self.received += 1
        self._advance(message)

    def abandon(self) -> None:
        """Flush what can be sent at once (a ``#FAILURE#`` the peer should see), then close."""
        if self._out:
            try:
                os.write(self.fd, self._out)
            except OSError:
                pass
        self._steps.close()
        os.close(self.fd)


# -- connecting --


async def connect(
    address: Any,
    *,
    authkey: bytes | None = None,
    family: str | None = None,
    insecure: bool = False,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Connection[Any, Any]:
    """Connect to a :func:`listen`-er (or a :class:`multiprocessing.connection.Listener`) at
    ``address``: a ``(host, port)`` tuple for TCP, a path for a Unix socket.

    With ``authkey``, both sides prove they know it (multiprocessing's challenge); the peer must use
    the same key. An authkey is required except for a Unix socket path: pass ``insecure=True`` to
    connect without one. ``authkey=b""`` is refused (``ValueError``): an empty key lets anyone in.
    ``handshake_timeout`` (seconds, finite and > 0) bounds the whole handshake.

    Raises ``multiprocessing.AuthenticationError`` if the peer refuses the key, does not know it or
    does not speak the handshake, ``ConnectionRefusedError`` if nobody listens,
    ``ConnectionResetError`` if the peer closes the connection during the handshake,
    ``TimeoutError`` if the handshake takes longer than ``handshake_timeout``.

    **Cancellation**: connecting and the handshake run in a thread of their own; if cancelled, the
    connection they make (if any) is closed.
    """
    _check_authkey(address, family, authkey, insecure)
    timeout = _check_seconds("handshake_timeout", handshake_timeout)
    writer = Writer("connect")
    try:
        conn = await writer.run(
            lambda job: _connect_blocking(job, address, family, authkey, timeout)
        )
    finally:
        writer.close()
    return Connection(conn)


def _connect_blocking(
    job: Job[mpc.Connection],
    address: Any,
    family: str | None,
    authkey: bytes | None,
    timeout: float,
) -> mpc.Connection:
    conn = mpc.Client(address, family)
    try:
        if authkey is not None:
            _client_handshake(job, conn.fileno(), address, authkey, timeout)
    except BaseException:
        conn.close()
        raise
    if not job.commit():
        conn.close()
    return conn


def _client_handshake(
    job: Job[mpc.Connection], fd: int, address: Any, authkey: bytes, timeout: float
) -> None:
    """The client's side of the challenge, within one deadline."""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    handshake = _Handshake(fd, _client_steps(authkey), deadline, address)
    poller = select.poll()
    poller.register(fd, handshake.events)
    while not handshake.run():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the handshake with {address!r} took more than {timeout} s")
        if job.abandoned:
            raise ClosedResourceError("connect() was abandoned")
        poller.modify(fd, handshake.events)
        poller.poll(math.ceil(min(left, POLL_SLICE) * 1000))
    os.set_blocking(fd, True)


# -- listening --


@dataclass(frozen=True)
class ListenerStatistics:
    """A snapshot of a :class:`Listener` (``Listener.statistics()``).

    The four counts of peers turned away do not overlap: each such peer is counted once.
    """

    #: Coroutines waiting in ``accept()``.
    waiting_acceptors: int
    #: Peers connected and not authenticated yet (at most ``max_handshakes``).
    handshakes: int
    #: Peers refused so far: a wrong key, not multiprocessing's handshake, a handshake message
    #: over ``HANDSHAKE_MESSAGE_MAX`` bytes, or the connection closed during the handshake.
    refused: int
    #: aioipc threads of this listener running (one at most: it accepts and drives every handshake).
    threads: int
    #: Peers whose handshake did not finish within ``handshake_timeout`` seconds.
    timed_out: int = 0
    #: Peers dropped to make room while ``max_handshakes`` were in progress: the oldest peer that
    #: has not answered the challenge yet, or the newcomer if every one has.
    dropped: int = 0
    #: Failures of ``accept()`` itself (descriptors or memory exhausted, a peer that aborted):
    #: logged on the ``aioipc`` logger, retried.
    accept_errors: int = 0


class _AcceptSource:
    """The reader thread's view of a listening socket: in one thread, it accepts peers and drives
    every handshake in progress with ``poll()``, on non-blocking sockets, and returns the peers
    that passed.

    Why one thread and not the event loop: a flood of peers then costs the application's loop
    nothing (the work of accepting, hashing and refusing is done elsewhere), it works the same
    under asyncio, uvloop and trio, and the thread is the one the bridge already has for
    ``accept()``. Why not a thread per handshake: hostile peers could make the process start
    threads without bound.
    """

    def __init__(
        self,
        sock: socket.socket,
        authkey: bytes | None,
        timeout: float,
        max_handshakes: int,
        address: Any,
    ) -> None:
        self._sock = sock
        self._listen_fd = sock.fileno()
        self._authkey = authkey
        self._timeout = timeout
        self._max_handshakes = max_handshakes
        self._address = address
        self._lock = threading.Lock()
        self._ready: deque[mpc.Connection] = deque()
        #: Handshakes in progress by fd, oldest first (so also by deadline).
        self._pending: dict[int, _Handshake] = {}
        self.refused = self.timed_out = self.dropped = self.accept_errors = 0
        self._closed = False
        self._poller = select.poll()
        self._poller.register(self._listen_fd, select.POLLIN)
        self._wake_fd = -1
        self._backoff = 0.0
        self._paused_until = 0.0

    @property
    def handshakes(self) -> int:
        return len(self._pending)

    def stopped(self) -> bool:
        return self._closed

    def read(
        self, max_items: int, max_bytes: int, wake_fd: int
    ) -> tuple[list[mpc.Connection], BaseException | None]:
        poller = self._poller
        if self._wake_fd != wake_fd:
            if self._wake_fd >= 0:
                poller.unregister(self._wake_fd)
            poller.register(wake_fd, select.POLLIN)
            self._wake_fd = wake_fd
        while True:
            with self._lock:
                if self._closed:
                    return [], None
                now = time.monotonic()
                self._expire(now)
                if self._ready:
                    return self._take_ready(), None
                wait = self._next_timeout(now)
            events = poller.poll(None if wait is None else math.ceil(wait * 1000))
            woken = accepting = False
            with self._lock:
                if self.stopped():  # by close(), while this thread waited
                    return [], None
                for fd, _ in events:
                    if fd == wake_fd:
                        woken = True
                    elif fd == self._listen_fd:
                        accepting = True
                    else:
                        handshake = self._pending.get(fd)
                        if handshake is not None:
                            self._step(handshake)
                if accepting:  # after the handshakes: an answer that came is read before any drop
                    try:
                        self._accept_some()
                    except OSError as exc:  # the listening socket itself failed
                        return self._take_ready(), exc
                if woken and not self._ready:
                    return [], None

    def _take_ready(self) -> list[mpc.Connection]:
        items = list(self._ready)
        self._ready.clear()
        return items

    def _next_timeout(self, now: float) -> float | None:
        """Seconds until the next deadline or the end of an accept pause (None: no limit)."""
        times = []
        if self._pending:
            times.append(next(iter(self._pending.values())).deadline)
        if self._paused_until:
            times.append(self._paused_until)
        return max(min(times) - now, 0.0) if times else None

    def _expire(self, now: float) -> None:
        """Time out the handshakes past their deadline; resume accepting after a pause."""
        pending = self._pending
        while pending:
            handshake = next(iter(pending.values()))
            if handshake.deadline > now:
                break
            self.timed_out += 1
            _logger.debug(
                "listener %r: the handshake with %r timed out", self._address, handshake.peer
            )
            self._drop(handshake)
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._poller.register(self._listen_fd, select.POLLIN)

    def _accept_some(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PEER_ERRNOS:
                    self.accept_errors += 1
                    _logger.debug("listener %r: accept() failed, retrying: %s", self._address, exc)
                    continue
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self.accept_errors += 1
                self._backoff = min(max(self._backoff * 2, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
                _logger.warning(
                    "listener %r: accept() failed (%s); accepting again in %.2f s",
                    self._address,
                    exc,
                    self._backoff,
                )
                self._poller.unregister(self._listen_fd)
                self._paused_until = time.monotonic() + self._backoff
                return
            self._backoff = 0.0
            self._admit(sock, peer)

    def _admit(self, sock: socket.socket, peer: object) -> None:
        if self._authkey is None:
            sock.setblocking(True)
            self._ready.append(mpc.Connection(sock.detach()))
            return
        if len(self._pending) >= self._max_handshakes and not self._make_room(peer):
            sock.close()
            return
        sock.setblocking(False)
        fd = sock.detach()
        handshake = _Handshake(
            fd, _server_steps(self._authkey), time.monotonic() + self._timeout, peer
        )
        self._pending[fd] = handshake
        self._poller.register(fd, handshake.events)
        self._step(handshake)

    def _make_room(self, newcomer: object) -> bool:
        """Drop the oldest handshake whose peer has not proven it knows the key; if every peer in
        progress has, the newcomer is dropped instead (False)."""
        self.dropped += 1
        for handshake in self._pending.values():
            if not handshake.received:
                _logger.debug(
                    "listener %r: %d handshakes in progress, dropping the oldest (with %r)",
                    self._address,
                    len(self._pending),
                    handshake.peer,
                )
                self._drop(handshake)
                return True
        _logger.debug("listener %r: no room for a handshake with %r", self._address, newcomer)
        return False

    def _step(self, handshake: _Handshake) -> None:
        try:
            done = handshake.run()
        except Exception as exc:  # whatever a peer's handshake raises ends that peer only
            self.refused += 1
            _logger.debug("listener %r: refused %r: %s", self._address, handshake.peer, exc)
            self._drop(handshake)
            return
        fd = handshake.fd
        if done:
            del self._pending[fd]
            self._poller.unregister(fd)
            os.set_blocking(fd, True)
            self._ready.append(mpc.Connection(fd))
        else:
            self._poller.modify(fd, handshake.events)

    def _drop(self, handshake: _Handshake) -> None:
        del self._pending[handshake.fd]
        self._poller.unregister(handshake.fd)
        handshake.abandon()

    def close(self) -> None:
        """Nothing to release here: the listener stops this source with :meth:`stop`."""

    def stop(self) -> list[mpc.Connection]:
        """Stop taking peers, end the handshakes in progress; return the peers that passed and
        were not taken."""
        with self._lock:
            self._closed = True
            for handshake in list(self._pending.values()):
                self._drop(handshake)
            return self._take_ready()


class Listener(AsyncResource):
    """Accepts connections from other processes or hosts: multiprocessing's
    :class:`~multiprocessing.connection.Listener`, with an async :meth:`accept`. Made by
    :func:`listen`.

    Peers may be :func:`aioipc.connect` or plain :func:`multiprocessing.connection.Client` callers.
    One thread accepts peers and drives their handshakes, each within ``handshake_timeout``, at most
    ``max_handshakes`` at a time: a peer that fails the challenge (it gets
    ``multiprocessing.AuthenticationError``), stalls it or floods the listener is refused without
    delaying the others, and the application's event loop does none of that work. Once
    :meth:`accept` has been called, the thread goes on accepting while no call waits, holding up
    to ``ACCEPT_AHEAD`` authenticated peers for the calls to come. See :meth:`statistics` and the
    listener security page of the documentation.
    """

    def __init__(
        self,
        address: Any = None,
        *,
        authkey: bytes | None = None,
        family: str | None = None,
        insecure: bool = False,
        backlog: int = 64,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self._closed = True  # until it is made
        if address is None and family is None:
            address = ("127.0.0.1", 0)
        _check_authkey(address, family, authkey, insecure)
        timeout = _check_seconds("handshake_timeout", handshake_timeout)
        _check_count("max_handshakes", max_handshakes, 1)
        _check_count("backlog", backlog, 0)
        self._listener = mpc.Listener(address, family, backlog)
        self._address = self._listener.address
        if authkey is None and _beyond_loopback(self._address):
            try:
                warnings.warn(
                    f"listening on {self._address!r} without an authkey (insecure=True): any host "
                    "that reaches this address may connect, and the messages it sends are "
                    "unpickled, which runs code",
                    InsecureListenerWarning,
                    stacklevel=3,
                )
            except BaseException:  # the warning is an error here: do not leave the socket open
                self._listener.close()
                raise
        sock: socket.socket = self._listener._listener._socket  # type: ignore[attr-defined]
        sock.setblocking(False)  # ours alone: accepting never waits in accept()
        self._source = _AcceptSource(sock, authkey, timeout, max_handshakes, self._address)
        self._reader: Reader[mpc.Connection] = Reader(
            self._source, name="listener", prefetch=ACCEPT_AHEAD, read_ahead=True
        )
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"address={self.address!r}"
        return f"<aioipc.Listener {state} at {id(self):#x}>"

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)

    def __getstate__(self) -> Any:
        raise TypeError("a Listener cannot be passed to another process; listen there instead")

    @property
    def address(self) -> Any:
        """The address peers connect to (with the port chosen by the system if 0 was given).

        It stays readable after :meth:`close`, with the address the listener had.
        """
        return self._address

    async def accept(self) -> Connection[Any, Any]:
        """Wait for the next peer that connects (and passes the challenge, with an authkey).

        Raises :class:`aioipc.ClosedResourceError` after ``close()``, also when closed while
        waiting.

        **Cancellation**: safe; a peer accepted for a cancelled call goes to the next one.
        """
        self._check_open()
        return Connection((await self._reader.take(1))[0])

    def __aiter__(self) -> AsyncIterator[Connection[Any, Any]]:
        return self

    async def __anext__(self) -> Connection[Any, Any]:
        try:
            return await self.accept()
        except ClosedResourceError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop listening (a Unix socket's file is removed). Idempotent. Waiting :meth:`accept`
        calls raise :class:`aioipc.ClosedResourceError`; handshakes in progress are ended;
        connections already accepted stay open."""
        if self._closed:
            return
        self._closed = True
        for conn in self._reader.close() + self._source.stop():
            conn.close()
        self._listener.close()

    def statistics(self) -> ListenerStatistics:
        """A snapshot of this listener: who waits, the handshakes in progress, and the peers
        turned away so far, by reason."""
        reader = self._reader.statistics()
        source = self._source
        with source._lock:
            return ListenerStatistics(
                waiting_acceptors=reader["waiting"],
                handshakes=source.handshakes,
                refused=source.refused,
                threads=reader["threads"],
                timed_out=source.timed_out,
                dropped=source.dropped,
                accept_errors=source.accept_errors,
            )


def listen(
    address: Any = None,
    *,
    authkey: bytes | None = None,
    family: str | None = None,
    insecure: bool = False,
    backlog: int = 64,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_handshakes: int = MAX_HANDSHAKES,
) -> Listener:
    """Listen for connections at ``address``: a ``(host, port)`` tuple for TCP (port 0: any free
    port, see ``listener.address``), a path for a Unix socket. The default is TCP on the loopback
    interface, any free port.

    With ``authkey``, every peer must prove it knows the key (multiprocessing's mutual challenge).
    An authkey is required except for a Unix socket path (guarded by the file's permissions): a
    peer's messages are unpickled, which runs code. ``authkey=b""`` is refused (``ValueError``): an
    empty key lets anyone in. Pass ``insecure=True`` to accept any peer; on an address beyond the
    loopback interface that warns (:class:`aioipc.InsecureListenerWarning`).

    Each handshake must finish within ``handshake_timeout`` seconds (a finite number > 0) from the
    moment the peer is accepted; at most ``max_handshakes`` (an int >= 1) run at a time: a new
    peer beyond that makes the oldest peer that has not answered the challenge yet give way (a
    peer that answered it right is never dropped for room). ``backlog`` (an int >= 0) is
    the socket's queue of connections not accepted yet.

    Use it as ``async with aioipc.listen(...) as listener:``, then ``await listener.accept()`` or
    ``async for conn in listener``.
    """
    return Listener(
        address,
        authkey=authkey,
        family=family,
        insecure=insecure,
        backlog=backlog,
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
    )


__all__ = [
    "Connection",
    "ConnectionStatistics",
    "InsecureListenerWarning",
    "Listener",
    "ListenerStatistics",
    "Pipe",
    "connect",
    "listen",
]
