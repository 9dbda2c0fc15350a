"""``aioipc.Connection`` and ``aioipc.Pipe`` (``aioipc.connect`` and ``aioipc.listen``, across
hosts, are in :mod:`aioipc._listener`).

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
import multiprocessing
import multiprocessing.connection as mpc
import os
import select
import socket
import stat
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing import context
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _fork
from ._bridge import Job, Reader, Writer
from ._exceptions import BrokenResourceError, ClosedResourceError
from ._loops import Checkpointer, FdWatch, Turns
from ._resource import AsyncResource
from ._wire import HEADER, PIPE_BUF, POLL_SLICE, READ_CHUNK, Wire, dumps, write_frame
from ._wire import header as frame_header

if TYPE_CHECKING:
    # Any object that exports a buffer (bytes, bytearray, memoryview, array.array, NumPy arrays),
    # as multiprocessing's own send_bytes takes; collections.abc.Buffer from Python 3.12 on.
    from _typeshed import ReadableBuffer

SendT = TypeVar("SendT")
RecvT = TypeVar("RecvT")


#: Frames up to this size (header included) may be written on the event loop's thread.
INLINE_SEND_MAX = PIPE_BUF
#: Messages up to this size are assembled on the loop; larger ones by the reader thread.
LOOP_MESSAGE_MAX = 256 * 1024
#: A margin for what a Unix socket charges its send buffer beyond a packet's payload: with a
#: buffer of twice (frame + margin) a small frame goes in one write, all or nothing (a margin, not
#: a measured figure; the duplex cases of tests/test_connection.py's make_pipe are socketpairs).
_UNIX_PACKET_OVERHEAD = 64

#: Connections wait for messages on the loop (a private epoll watch) where the system has epoll and
#: eventfd (Linux); elsewhere their reader thread waits. The pool reads answers the same way.
HAVE_READINESS = hasattr(select, "epoll") and hasattr(os, "eventfd")
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: Whether reads and writes may pass RWF_NOWAIT (Linux 4.14+ for the flag; pipes and sockets take
#: it on recent kernels). Turned off at the first refusal.
_nowait_writes = bool(_RWF_NOWAIT)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0)


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
        self._readiness = HAVE_READINESS if _readiness is None else _readiness
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
        self._turns = Turns(
            "this connection end is being received from on another thread's event loop: "
            "one end is received from on one event loop at a time"
        )
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

    async def send_bytes(
        self, buf: ReadableBuffer, offset: int = 0, size: int | None = None
    ) -> None:
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
        header = frame_header(len(data))
        payload = data if owned else memoryview(bytes(data))
        await self._writer.run(lambda job: self._send_waiting(job, header, payload))

    def _send_now(self, data: memoryview) -> bool:
        """Write a small message on this thread if that cannot block; False if it must wait (it is
        too large, earlier sends wait, or there is no room)."""
        global _nowait_writes
        if len(data) > INLINE_SEND_MAX - HEADER.size or self._writer.busy:
            return False
        header = HEADER.pack(len(data))
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
        return sock.family == socket.AF_UNIX and sndbuf >= 2 * (
            INLINE_SEND_MAX + _UNIX_PACKET_OVERHEAD
        )
    finally:
        sock.detach()


def closed_end() -> Connection[Any, Any]:
    """A connection end that is closed already: what a closed end passed to a child becomes
    there (:func:`aioipc.open_process`). ``close()`` is a no-op, everything else raises."""
    end: Connection[Any, Any] = Connection.__new__(Connection)
    end._closed = True
    return end


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


__all__ = ["Connection", "ConnectionStatistics", "Pipe", "closed_end"]
