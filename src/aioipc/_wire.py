"""The bytes on the wire, shared by queues and connections.

Both carry the frames of :class:`multiprocessing.connection.Connection`: a 4-byte big-endian
length (or -1 and an 8-byte length), then the payload, a pickle made by
:class:`~multiprocessing.reduction.ForkingPickler`. This module holds everything about those
frames that does not depend on who reads them: pickling in the caller, frame headers, writes that
never leave a frame cut, reads that cannot wait, how many bytes are waiting in a pipe, and
:class:`Wire`, the one incremental parser of a stream of frames.

The two readers differ in one way only. A connection end has one reader, so it may read ahead:
:class:`Wire` takes what has arrived and keeps a partial frame for later. A queue's pipe is shared
by every consumer process, so a queue reads exactly one frame at a time, header then body, never a
byte of the next one (``SyncQueue.take_frame``).

Waiting for room or for data uses ``poll()``, never ``select()``: a process may hold more than
1,024 file descriptors.
"""

from __future__ import annotations

import copyreg
import errno
import io
import os
import pickle
import select
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler

try:
    import fcntl
    import termios
except ImportError:  # not a POSIX system: say so at import, not at the first get
    raise ImportError(
        "aioipc needs a POSIX system (Linux is the tested platform); it does not run on "
        f"{sys.platform}"
    ) from None

HEADER = struct.Struct("!i")
LONG_HEADER = struct.Struct("!Q")
#: The longest body a 4-byte header can announce; a longer one is announced as -1 and an 8-byte
#: length, as multiprocessing does (tests/test_wire.py writes and reads both).
SHORT_FRAME_MAX = 2**31 - 1
#: A frame's body as read from the wire.
Frame = bytes | bytearray | memoryview

#: How long a blocked call sleeps at most before it looks at the shared shutdown flag again
#: (so that waiters in every process see ``shutdown()`` within about this long), and the slice
#: in which a thread waiting for room or data checks whether its caller gave up.
POLL_SLICE = 0.05

#: A write of at most this many bytes to a pipe is whole or nothing (POSIX ``PIPE_BUF``; 512 is the
#: smallest value POSIX allows, for platforms that do not say).
PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)
#: The most bytes one read of a connection takes from the fd, on the loop or in the reader thread.
READ_CHUNK = 256 * 1024
#: A frame this large no longer fits the default pipe comfortably: the first one makes a queue grow
#: its pipe (see ``_mpqueue.PIPE_SIZE``).
LARGE_FRAME = 16 * 1024

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: Whether reads and writes may pass RWF_NOWAIT (Linux 4.14+ for the flag; pipes and sockets take
#: it on recent kernels). Turned off at the first refusal.
_nowait_reads = bool(_RWF_NOWAIT)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
ENDED_EVENTS = select.POLLHUP | select.POLLERR | select.POLLNVAL | _POLLRDHUP


# --------------------------------------------------------------------------------------------
# Pickling
# --------------------------------------------------------------------------------------------


class _Pickling(threading.local):
    """One reusable pickler per thread: building a ForkingPickler copies the reducer tables,
    which costs more than pickling a small object (``dumps(1)``: 5.3 us to 2.4 us). It is rebuilt
    when reducers were registered since (``copyreg.pickle``, ``ForkingPickler.register``)."""

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


#: Types the C pickler writes itself, before it consults any reducer table: for these, plain
#: ``pickle.dumps`` gives the very bytes a ForkingPickler would (same default protocol), at less
#: than half the cost.
_ATOMS = frozenset({int, float, str, bytes, bool, type(None)})


def dumps(obj: object) -> memoryview:
    """Pickle ``obj`` for another process, or raise TypeError naming its type."""
    if type(obj) in _ATOMS:
        return memoryview(pickle.dumps(obj, pickle.DEFAULT_PROTOCOL))
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


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def header(size: int) -> bytes:
    """The header of a frame whose body has ``size`` bytes."""
    if size > SHORT_FRAME_MAX:
        return HEADER.pack(-1) + LONG_HEADER.pack(size)
    return HEADER.pack(size)


def frame(data: bytes | memoryview) -> list[bytes | memoryview]:
    """A whole frame as chunks to write: the header, then ``data``."""
    return [header(len(data)), data]


def write_frame(fd: int, chunks: list[bytes | memoryview], skip: int = 0) -> None:
    """Write a whole frame (after its first ``skip`` bytes, already written) to a blocking fd."""
    while chunks:
        while chunks and skip >= len(chunks[0]):
            skip -= len(chunks[0])
            chunks.pop(0)
        if skip:
            chunks[0] = memoryview(chunks[0])[skip:]
        if chunks:
            skip = os.writev(fd, chunks)


def _write_keeping_gil() -> tuple[Callable[[int, bytes, int], int], Callable[[], int]] | None:
    """The C library's ``write``, called without releasing the GIL (``ctypes.PyDLL``), and the
    ``errno`` it left; None if ctypes cannot reach it."""
    try:
        import ctypes

        write = ctypes.PyDLL(None, use_errno=True).write
    except (ImportError, OSError, AttributeError):
        return None
    write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    write.restype = ctypes.c_ssize_t
    return write, ctypes.get_errno


_KEEPING_GIL = _write_keeping_gil()


def write_nowait(fd: int, buf: bytes) -> None:
    """Write ``buf``, at most PIPE_BUF bytes, to the non-blocking pipe ``fd``: whole, or not at all
    (``BlockingIOError``: no room for it now).

    The calling thread keeps the GIL through the system call, which cannot wait. A thread that
    writes while holding a lock other threads try (a queue's feeder) then never has to win the
    GIL back from a busy thread before it can let go of the lock: otherwise it could hold the lock
    for a whole switch interval (5 ms) after every write.
    """
    if _KEEPING_GIL is None:
        os.write(fd, buf)
        return
    write, get_errno = _KEEPING_GIL
    while write(fd, buf, len(buf)) < 0:
        code = get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))  # EAGAIN makes a BlockingIOError


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def available(fd: int) -> int:
    """Bytes waiting in a pipe or socket (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, sys.byteorder, signed=True)


def read_nowait(fd: int, buffers: list[memoryview]) -> int:
    """Read what is there without waiting, leaving the fd blocking; ``BlockingIOError`` if nothing
    is (bytes or the end of the stream)."""
    global _nowait_reads
    if _nowait_reads:
        try:
            return os.preadv(fd, buffers, -1, _RWF_NOWAIT)
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _nowait_reads = False  # an older kernel: ask FIONREAD and poll first
    if available(fd) == 0:
        poller = select.poll()
        poller.register(fd, select.POLLIN | _POLLRDHUP)
        if not any(events & ENDED_EVENTS for _, events in poller.poll(0)):
            raise BlockingIOError(errno.EAGAIN, "nothing to read")
    return os.readv(fd, buffers)


def read_available(fd: int, buf: bytearray | memoryview) -> int:
    """Read into ``buf`` what is there, without waiting: the number of bytes read, 0 if none is
    (on a pipe that still has a writer). The fd stays blocking for its other users."""
    global _nowait_reads
    if _nowait_reads:
        try:
            return os.preadv(fd, [buf], -1, _RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _nowait_reads = False  # an older kernel: ask FIONREAD first
    n = min(available(fd), len(buf))
    return os.readv(fd, [memoryview(buf)[:n]]) if n > 0 else 0


#: Each thread's read buffer: frames are copied out of it before the reading call returns.
_scratch = threading.local()


class Wire:
    """What this process has read from one connection end: whole frames not handed out yet, and the
    message being read (its chunks, joined once it is whole).

    One side uses it at a time: the event loop, or the reader thread while it owns it
    (``thread_owned``) to finish a large message. The thread reads a message's body into chunks of
    its own, never past the message, and joins them without holding the GIL (``bytes.join`` drops
    it for large results): a large message costs the loop no copy and no allocation.
    """

    __slots__ = ("_chunks", "_got", "_head", "_size", "end", "fd", "frames", "thread_owned")

    def __init__(self, fd: int, *, thread_owned: bool) -> None:
        self.fd = fd
        self.frames: deque[bytes] = deque()
        self.end: BaseException | None = None
        self.thread_owned = thread_owned
        self._head = b""  # the start of a header that did not arrive whole
        self._size = -1  # the size of the message being read; -1: none
        self._chunks: list[bytes] = []  # what has arrived of it
        self._got = 0

    @property
    def message_size(self) -> int:
        """The size of the message being read; 0 if none has started (or its header is partial)."""
        return max(self._size, 0)

    @property
    def in_message(self) -> bool:
        """True while part of a message has been read."""
        return self._size >= 0 or bool(self._head)

    def ingest(self, limit: int, *, wait: bool) -> bool:
        """Read once, at most ``limit`` bytes.

        Without ``wait`` it never blocks and returns False if nothing was there. With ``wait`` (the
        reader thread) the caller has seen the fd readable, so the read returns at once.
        """
        fd = self.fd
        try:
            if wait and self._size >= 0:
                chunk = os.read(fd, min(limit, self._size - self._got))
                if chunk:
                    self._add(chunk)
                    return True
            else:
                try:
                    scratch: memoryview = _scratch.view
                except AttributeError:
                    scratch = _scratch.view = memoryview(bytearray(READ_CHUNK))
                h = len(self._head)
                if h:
                    scratch[:h] = self._head
                buffers = [scratch[h : h + limit]]
                n = os.readv(fd, buffers) if wait else read_nowait(fd, buffers)
                if n:
                    self._feed(scratch, h + n)
                    return True
        except BlockingIOError:
            return False
        except (ConnectionResetError, BrokenPipeError) as exc:
            self._ended(EOFError(f"the peer is gone ({exc.strerror})"))
            return True
        if self.in_message:
            self._ended(EOFError("the peer closed the connection in the middle of a message"))
        else:
            self._ended(EOFError())
        return True

    def _ended(self, exc: BaseException) -> None:
        self.end = exc
        self._head, self._size, self._chunks = b"", -1, []

    def _add(self, chunk: bytes) -> None:
        """Add a piece of the message being read; hand the message out once it is whole."""
        if chunk:
            self._chunks.append(chunk)
            self._got += len(chunk)
        if self._got == self._size:
            chunks = self._chunks
            self.frames.append(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            self._size, self._chunks, self._got = -1, [], 0

    def _feed(self, view: memoryview, end: int) -> None:
        """Take in the bytes ``view[:end]``, just read (after the start of a partial header)."""
        self._head = b""
        pos = 0
        if self._size >= 0:
            pos = min(end, self._size - self._got)
            self._add(bytes(view[:pos]))
            if self._size >= 0:
                return
        frames = self.frames
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(view, pos)
            start = pos + 4
            if size == -1:
                if end - pos < 12:
                    break
                (size,) = LONG_HEADER.unpack_from(view, start)
                start += 8
            elif size < 0:
                self._ended(OSError(f"bad message length {size}: not a connection's stream"))
                return
            if end - start >= size:
                frames.append(bytes(view[start : start + size]))
                pos = start + size
            else:
                self._size, self._chunks, self._got = size, [], 0
                self._add(bytes(view[start:end]))
                return
        self._head = bytes(view[pos:end])


#: Wake-up bytes read off a wake pipe at once: any number of pending wake-ups means "look".
WAKE_DRAIN_BYTES = 4096


def drain_wakeups(fd: int) -> None:
    """Read and drop the wake-up bytes waiting in the non-blocking pipe ``fd`` (a thread's wake
    pipe: how many there were does not matter)."""
    try:
        os.read(fd, WAKE_DRAIN_BYTES)
    except OSError:  # none (EAGAIN), or the pipe was closed meanwhile
        pass


def read_watched(fd: int, view: memoryview, check: Callable[[], None]) -> None:
    """Fill ``view`` from the non-blocking fd, waiting for the rest in slices of POLL_SLICE:
    between two, ``check()`` may raise to give up (a queue's: its writer died inside the item)."""
    poller: select.poll | None = None
    while view:
        n = read_available(fd, view)
        if not n:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            if not poller.poll(POLL_SLICE * 1000):
                check()
                continue
            n = os.readv(fd, [view])
            if not n:
                raise OSError("got end of file during message")
        view = view[n:]


def read_frame_watched(fd: int, check: Callable[[], None], head: bytes = b"") -> bytearray:
    """One whole frame (after the ``head`` of its header, already read), waiting as
    :func:`read_watched` does."""
    start = bytearray(HEADER.size)
    start[: len(head)] = head
    read_watched(fd, memoryview(start)[len(head) :], check)
    (size,) = HEADER.unpack(start)
    if size == -1:
        long = bytearray(LONG_HEADER.size)
        read_watched(fd, memoryview(long), check)
        (size,) = LONG_HEADER.unpack(long)
    elif size < 0:
        raise OSError(f"bad frame length {size}: the stream is broken")
    body = bytearray(size)
    if size:
        read_watched(fd, memoryview(body), check)
    return body


def write_watched(fd: int, buf: bytes | memoryview, check: Callable[[], None]) -> None:
    """Write all of ``buf`` to the non-blocking fd, waiting for room in slices of POLL_SLICE:
    between two, ``check()`` may raise to give up (a queue's: nobody will read it again)."""
    view = memoryview(buf)
    poller: select.poll | None = None
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            if not poller.poll(POLL_SLICE * 1000):
                check()
