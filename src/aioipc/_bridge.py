"""The bridge between blocking multiprocessing calls and coroutines.

A :class:`Reader` owns one daemon thread per channel end per process. The thread blocks on the
channel for the coroutines parked in its FIFO, drains what is already there without blocking (up to
a count and a byte limit) and hands the batch over with a single thread-safe wake-up of each event
loop that has waiters. Items nobody is waiting for yet stay in a bounded per-process buffer
(``prefetch``); a coroutine that finds an item there takes it without any thread hop.

A :class:`Writer` does the same for the rare operations that must wait to *send*: a ``put`` into a
full bounded queue, a ``send`` into a full pipe. Waits in aioipc never use anyio's shared thread
limiter or the loop's default executor: a wait that may last forever must not starve the rest of the
application.

Cancellation is exact. Items are assigned to a waiter only on its own event loop's thread, in
the same step that wakes it; a waiter cancelled after that point gives its items back to the
front of the buffer, ahead of newer items, for the next waiter of this process.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from . import _fork
from ._exceptions import ClosedResourceError
from ._loops import LoopHandle, Waiter, current_loop
from ._wire import drain_wakeups

T = TypeVar("T")
R = TypeVar("R")

#: A waiter FIFO is rebuilt without its abandoned waiters once more than this many (and more than
#: the live ones) pile up: abandoned waiters are skipped lazily, and a rebuild per cancellation
#: would cost O(n) each (no test pins the value; tests/test_cancellation.py's random timeouts
#: abandon many waiters).
COMPACT_DEAD_WAITERS = 64
#: The most items a reader thread hands over in one batch, and the most bytes: one loop wake-up
#: per batch, bounded so that a batch never holds the loop for long (the throughput rows, and
#: "Loop responsiveness"; the byte bound keeps a batch of 1 MiB items to one or two items: batching
#: large payloads in a thread measured 0.5-0.7x).
READ_BATCH_ITEMS = 256
READ_BATCH_BYTES = 1 << 20
#: How long close() waits for its thread to stop: a thread between two slices of its wait stops
#: within POLL_SLICE; one inside a long write is left (it is a daemon) rather than block the
#: caller (tests/test_threads.py: closing stops the threads).
THREAD_JOIN_TIMEOUT = 1.0

# --------------------------------------------------------------------------------------------
# Fork safety: every live hub forgets its threads in a forked child
# --------------------------------------------------------------------------------------------

_live_hubs: weakref.WeakSet[_Hub] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for hub in list(_live_hubs):
        hub._after_fork()


_fork.register(_after_fork_in_child)


class _WaiterQueue:
    """One hub's waiters on one event loop, FIFO. Abandoned waiters are skipped lazily."""

    __slots__ = ("dead", "delivery_pending", "live", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[Waiter] = deque()
        self.live = 0
        self.dead = 0
        #: A wake-up of the loop is scheduled and has not run yet (coalesces wake-ups).
        self.delivery_pending = False

    def append(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)
        self.live += 1

    def popleft(self) -> Waiter | None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.dead:
                self.dead -= 1
            else:
                self.live -= 1
                return waiter
        return None

    def peek_want(self) -> int:
        """How many items the first live waiter wants (0 if there is none)."""
        waiters = self.waiters
        while waiters and waiters[0].dead:
            waiters.popleft()
            self.dead -= 1
        return waiters[0].want if waiters else 0

    def discard(self, waiter: Waiter) -> None:
        waiter.dead = True
        self.live -= 1
        self.dead += 1
        if self.dead > COMPACT_DEAD_WAITERS and self.dead > self.live:
            self.waiters = deque(w for w in self.waiters if not w.dead)
            self.dead = 0


class _Hub:
    """State shared by readers and writers: a lock, per-loop waiter FIFOs, a thread, fork safety."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._reset()
        _live_hubs.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._loops: dict[LoopHandle, _WaiterQueue] = {}
        self._n_waiting = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def _after_fork(self) -> None:
        # Waiters and threads belong to the parent; a forked child starts afresh.
        self._reset()

    # -- waiters (called on loop threads, with the lock held) --

    def _enqueue(self, waiter: Waiter) -> None:
        queue = self._loops.get(waiter.loop)
        if queue is None:
            queue = self._loops[waiter.loop] = _WaiterQueue()
        queue.append(waiter)
        self._n_waiting += 1

    def _discard(self, waiter: Waiter) -> None:
        if not waiter.dead:
            self._loops[waiter.loop].discard(waiter)
            self._n_waiting -= 1

    def _request_delivery(self, loops: list[LoopHandle]) -> None:
        """Wake each loop once (called without the lock, from any thread)."""
        for loop in loops:
            loop.call_soon_threadsafe(lambda loop=loop: self._deliver(loop))  # type: ignore[misc]

    def _loops_to_wake(self) -> list[LoopHandle]:
        """Loops with live waiters and no delivery pending yet (lock held)."""
        loops = []
        for loop, queue in self._loops.items():
            if queue.live and not queue.delivery_pending:
                queue.delivery_pending = True
                loops.append(loop)
        return loops

    def _deliver(self, loop: LoopHandle) -> None:
        raise NotImplementedError

    def _start_thread(self, target: Callable[[], None], kind: str) -> None:
        thread = threading.Thread(target=target, name=f"aioipc-{kind}-{self._name}", daemon=True)
        self._thread = thread
        thread.start()

    def statistics(self) -> dict[str, int]:
        thread = self._thread
        return {
            "waiting": self._n_waiting,
            "threads": int(thread is not None and thread.is_alive()),
        }


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class Source(Protocol[T]):
    """A blocking channel end as the reader thread sees it."""

    def read(
        self, max_items: int, max_bytes: int, wake_fd: int
    ) -> tuple[list[T], BaseException | None]:
        """Wait for at least one item, then add those already available within the limits.

        Return early (possibly with no items) when ``wake_fd`` becomes readable. The second element
        is the exception that ends the channel for this process after the items (``ShutDown``,
        ``EOFError``...), or None.
        """
        ...


class Reader(_Hub, Generic[T]):
    """Hands items from a :class:`Source` to coroutines, through one reader thread.

    The thread reads only while coroutines of this process wait: as many items as they want, plus
    at most ``prefetch`` more, and nothing once none waits. Items it read for a waiter that left
    stay in :attr:`buffer` for the next one.
    """

    def __init__(
        self,
        source: Source[T],
        *,
        name: str,
        prefetch: int,
        read_ahead: bool = False,
        max_batch: int = READ_BATCH_ITEMS,
        max_batch_bytes: int = READ_BATCH_BYTES,
        giveback: Callable[[list[T]], None] | None = None,
    ) -> None:
        self._source = source
        #: Where items read but never handed out go when the reader closes (a shared queue puts
        #: them back; a connection's messages have nowhere to go).
        self._giveback = giveback
        self._prefetch = prefetch
        #: Keep ``prefetch`` items ready even while nobody waits (a listener accepting ahead);
        #: otherwise the thread reads only while coroutines wait (a shared queue).
        self._read_ahead = read_ahead
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        super().__init__(name)

    def _reset(self) -> None:
        super()._reset()
        self.buffer: deque[T] = deque()
        self._end: BaseException | None = None
        self._wake_r, self._wake_w = -1, -1
        #: Items the source has started to read for this process without a waiter (a frame that
        #: had partly arrived when ``get_nowait()`` looked): the thread finishes them.
        self._owed = 0
        #: The thread is in ``source.read``: items it takes are on their way to the buffer.
        self._reading = False

    def _after_fork(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        super()._after_fork()

    # -- the coroutine side --

    @property
    def idle(self) -> bool:
        """No coroutine of this process waits here and the thread holds no item on its way to
        the buffer: a coroutine that arrives now may take the next item from the source itself
        without overtaking anything."""
        return (
            self._n_waiting == 0
            and not self._reading
            and not self.buffer
            and self._end is None
            and not self._closed
        )

    def take_nowait(self) -> T:
        """An item already in this process, or raise ``IndexError`` (or the end of the channel).

        Waiting coroutines go first: while any waits, this takes nothing.
        """
        if self._n_waiting == 0:
            try:
                return self.buffer.popleft()
            except IndexError:
                pass
        if self._closed or (self._end is not None and not self.buffer):
            raise self._ending()
        raise IndexError

    def take_many_nowait(self, n: int) -> list[T]:
        """Up to ``n`` items already in this process (none while coroutines wait)."""
        buffer = self.buffer
        if self._n_waiting or not buffer:
            return []
        return [buffer.popleft() for _ in range(min(n, len(buffer)))]

    def owe(self) -> None:
        """The source started an item for this process with nobody waiting: let the thread
        finish it into the buffer."""
        with self._lock:
            if self._closed:
                return
            self._owed += 1
            if self._thread is None:
                self._start_reader()
            else:
                self._wakeup.notify()

    async def take(self, want: int = 1) -> list[T]:
        """Wait for 1 to ``want`` items."""
        loop = current_loop()
        with self._lock:
            if self._closed:
                raise ClosedResourceError
            buffer = self.buffer
            if buffer and self._n_waiting == 0:
                n = min(want, len(buffer))
                return [buffer.popleft() for _ in range(n)]
            if self._end is not None and not buffer:
                raise self._ending()
            waiter = Waiter(loop, want)
            self._enqueue(waiter)
            try:
                if self._thread is None:
                    self._start_reader()
                else:
                    self._wakeup.notify()
            except BaseException:  # no thread (out of threads or descriptors): leave no trace
                self._discard(waiter)
                raise
            # Items already here (a waiter of another loop was served first): deliver them.
            loops = self._loops_to_wake() if buffer else []
        if loops:
            self._request_delivery(loops)
        try:
            await loop.park(waiter, self._abandon)
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.error is not None:
            waiter.raise_error()
        assert waiter.items is not None
        return waiter.items

    def _ending(self) -> BaseException:
        """A fresh copy of the exception that ends this reader (one instance per raise)."""
        if self._closed:
            return ClosedResourceError()
        assert self._end is not None
        return copy.copy(self._end)

    def give_back(self, items: list[T]) -> None:
        """Items taken from this reader and not handed out go back to the front of the buffer,
        in order, for the next waiter of this process."""
        if not items:
            return
        with self._lock:
            self.buffer.extendleft(reversed(items))
            loops = self._loops_to_wake()
        self._request_delivery(loops)

    def _abandon(self, waiter: Waiter) -> None:
        """The waiter is gone (cancelled, timed out): its items go back, ahead of newer ones."""
        with self._lock:
            if waiter.items:
                self.buffer.extendleft(reversed(waiter.items))
                waiter.items = None
                loops = self._loops_to_wake()
            else:
                self._discard(waiter)
                if self._n_waiting == 0 and not self._read_ahead and self._wake_w >= 0:
                    # Nobody wants an item any more: stop the thread's wait, so that it takes none.
                    _wake(self._wake_w)
                return
        self._request_delivery(loops)

    def _deliver(self, loop: LoopHandle) -> None:
        """On ``loop``'s thread: give buffered items (or the end) to its waiters, FIFO."""
        with self._lock:
            queue = self._loops[loop]
            queue.delivery_pending = False
            buffer = self.buffer
            ended = self._closed or self._end is not None
            woken = []
            while queue.live > 0 and (buffer or ended):
                waiter = queue.popleft()
                assert waiter is not None
                self._n_waiting -= 1
                waiter.dead = True  # out of the FIFO: abandoning it later discards nothing
                if buffer:
                    n = min(waiter.want, len(buffer))
                    waiter.items = [buffer.popleft() for _ in range(n)]
                else:
                    waiter.error = self._ending()
                woken.append(waiter)
            # Items left over go to the waiters of other loops of this process.
            loops = self._loops_to_wake() if buffer or ended else []
        for waiter in woken:
            loop.wake(waiter)
        if loops:
            self._request_delivery(loops)

    # -- the thread side --

    def _start_reader(self) -> None:
        wake_r, wake_w = os.pipe()
        try:
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)  # written on the loop's thread: never wait there
            self._wake_r, self._wake_w = wake_r, wake_w
            self._start_thread(self._run, "reader")
        except BaseException:
            os.close(wake_r)
            os.close(wake_w)
            self._wake_r = self._wake_w = -1
            self._thread = None
            raise

    def _demand(self) -> int:
        """How many more items this process wants now (lock held): what its waiters want, plus
        ``prefetch`` while any waits, less what is buffered."""
        wanted = self._owed
        for queue in self._loops.values():
            if queue.live:
                wanted += max(queue.peek_want(), 1) + queue.live - 1
        if self._read_ahead:
            return max(wanted, self._prefetch) - len(self.buffer)
        if wanted == 0:
            return 0
        return wanted + self._prefetch - len(self.buffer)

    def _run(self) -> None:
        source, wake_r = self._source, self._wake_r
        while True:
            want = self._wait_for_demand()
            if not want:
                return
            try:
                items, end = source.read(want, self._max_batch_bytes, wake_r)
            except BaseException as exc:  # the channel broke: report it to the waiters
                # (raised as copies, which carry no traceback: keeping this one's would make a
                # cycle through this frame, and keep the channel alive until the collector runs)
                items, end = [], exc.with_traceback(None)
            if not items and end is None:
                self._reading = False
                drain_wakeups(wake_r)
                continue
            with self._lock:
                self._reading = False
                if self._closed:  # closed while we read: the items go back where they came from
                    if items and self._giveback is not None:
                        self._giveback(items)
                    return
                self._owed = max(self._owed - len(items), 0)
                self.buffer.extend(items)
                if end is not None:
                    self._end = end
                loops = self._loops_to_wake()
            self._request_delivery(loops)

    def _wait_for_demand(self) -> int:
        """Block until coroutines want items; how many to read (0: the reader is done)."""
        with self._lock:
            while not self._closed and self._end is None and self._demand() <= 0:
                self._wakeup.wait()
            if self._closed or self._end is not None:
                return 0
            self._reading = True
            return min(max(self._demand(), 1), self._max_batch)

    def end(self, exc: BaseException, *, discard: bool = False) -> list[T]:
        """End the channel for this process: waiters get the buffered items (none if ``discard``),
        then ``exc``. Used by shutdown and supervision. Returns the discarded items."""
        with self._lock:
            if self._closed:
                return []
            if self._end is None:
                self._end = exc
            dropped: list[T] = []
            if discard:
                dropped = list(self.buffer)
                self.buffer.clear()
            loops = self._loops_to_wake()
            self._wakeup.notify_all()
            thread = self._thread
        if thread is not None:
            _wake(self._wake_w)
        self._request_delivery(loops)
        return dropped

    # -- closing --

    def close(self) -> list[T]:
        """Stop the thread and wake every waiter with ClosedResourceError.

        Returns the buffered items, for the caller to give back.
        """
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            items = list(self.buffer)
            self.buffer.clear()
            loops = self._loops_to_wake()
            self._wakeup.notify_all()
            thread = self._thread
        if thread is not None:
            _wake(self._wake_w)
        self._request_delivery(loops)
        if thread is not None and thread is not threading.current_thread():
            thread.join(THREAD_JOIN_TIMEOUT)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        return items

    def statistics(self) -> dict[str, int]:
        stats = super().statistics()
        stats["buffered"] = len(self.buffer)
        return stats


def _wake(fd: int) -> None:
    """Wake the reader thread (a full wake pipe has woken it already)."""
    try:
        os.write(fd, b"x")
    except BlockingIOError:
        pass


# --------------------------------------------------------------------------------------------
# Writing (sends that must wait)
# --------------------------------------------------------------------------------------------


class Job(Generic[R]):
    """One pending blocking call for a :class:`Writer`'s thread.

    ``fn`` runs in the thread and receives the job; it must call :meth:`commit` right before the
    point of no return (an item is handed over) and give up when :meth:`commit` returns False.
    ``fn`` waits in slices and checks :attr:`abandoned` between them.
    """

    __slots__ = ("_hub", "committed", "fn", "undo", "waiter")

    def __init__(
        self,
        hub: Writer,
        waiter: Waiter,
        fn: Callable[[Job[R]], R],
        undo: Callable[[R], object] | None = None,
    ) -> None:
        self._hub = hub
        self.waiter = waiter
        self.fn = fn
        self.undo = undo
        self.committed = False

    @property
    def abandoned(self) -> bool:
        return self.waiter.dead or self._hub._closed

    def commit(self) -> bool:
        with self._hub._lock:
            if self.waiter.dead or self._hub._closed:
                return False
            self.committed = True
            return True


class Writer(_Hub):
    """Runs blocking sends for coroutines, one at a time and in FIFO order, in one thread."""

    def _reset(self) -> None:
        super()._reset()
        self._jobs: deque[Job[Any]] = deque()
        self._done: deque[
            tuple[Waiter, Any, BaseException | None, Callable[[Any], object] | None]
        ] = deque()

    @property
    def busy(self) -> bool:
        """True while sends are pending: a new send must queue behind them to keep FIFO order."""
        return bool(self._jobs)

    async def run(self, fn: Callable[[Job[R]], R], undo: Callable[[R], object] | None = None) -> R:
        """Run ``fn`` in the writer thread, after the sends queued before it.

        If cancelled before ``fn`` committed, nothing was done. After that, ``fn`` completes; if
        its result can no longer reach the caller (cancelled meanwhile), ``undo(result)`` is called
        when given, so that the caller's cancellation means "not done"; without ``undo`` the work
        stays done and the cancellation is still raised. If the writer is closed before ``fn``
        committed, the call raises :class:`aioipc.ClosedResourceError`.
        """
        loop = current_loop()
        with self._lock:
            if self._closed:
                raise ClosedResourceError
            waiter = Waiter(loop, 1)
            job: Job[R] = Job(self, waiter, fn, undo)
            self._enqueue(waiter)
            self._jobs.append(job)
            try:
                if self._thread is None:
                    self._start_thread(self._run, "writer")
                else:
                    self._wakeup.notify()
            except BaseException:  # no thread could start: leave no job behind
                self._jobs.remove(job)
                self._discard(waiter)
                self._thread = None
                raise
        try:
            await loop.park(waiter, self._abandon)
        except BaseException:
            self._abandon(waiter)
            if waiter.items and undo is not None:  # done, but the caller is gone: undo it
                undo(waiter.items[0])
            raise
        if waiter.error is not None:
            waiter.raise_error()
        assert waiter.items is not None
        return waiter.items[0]  # type: ignore[no-any-return]

    def _abandon(self, waiter: Waiter) -> None:
        with self._lock:
            self._discard(waiter)
            undone = [entry for entry in self._done if entry[0] is waiter]
            for entry in undone:
                self._done.remove(entry)
        for _, result, error, undo in undone:  # finished for a caller that has gone
            if error is None and undo is not None:
                undo(result)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._jobs:
                    self._wakeup.wait()
                if self._closed:
                    return
                job = self._jobs[0]
            result: Any = None
            error: BaseException | None = None
            if not job.abandoned:
                try:
                    result = job.fn(job)
                except BaseException as exc:
                    error = exc
            with self._lock:
                if self._jobs and self._jobs[0] is job:  # close() may have cleared the FIFO
                    self._jobs.popleft()
                if error is None and not job.committed and job.abandoned:
                    # Closed (or abandoned) before it could happen: not done.
                    error = ClosedResourceError()
                if not job.waiter.dead:
                    self._done.append((job.waiter, result, error, job.undo))
                    loops = self._loops_to_wake()
                else:
                    loops = []
                    if job.committed and job.undo is not None and error is None:
                        job.undo(result)
            self._request_delivery(loops)
            del job, result, error  # an error's traceback holds this frame: no cycle while idle

    def _deliver(self, loop: LoopHandle) -> None:
        with self._lock:
            self._loops[loop].delivery_pending = False
            woken = []
            for _ in range(len(self._done)):
                waiter, result, error, undo = self._done.popleft()
                if waiter.loop is not loop:
                    self._done.append((waiter, result, error, undo))
                    continue
                if waiter.dead:
                    if error is None and undo is not None:
                        undo(result)
                    continue
                self._discard_delivered(waiter)
                waiter.items = [result]
                waiter.error = error
                woken.append(waiter)
            if self._closed:
                queue = self._loops.get(loop)
                while queue is not None and queue.live:
                    waiter2 = queue.popleft()
                    assert waiter2 is not None
                    self._n_waiting -= 1
                    waiter2.dead = True
                    waiter2.error = ClosedResourceError()
                    woken.append(waiter2)
        for waiter in woken:
            loop.wake(waiter)

    def _discard_delivered(self, waiter: Waiter) -> None:
        # A delivered waiter leaves the FIFO like an abandoned one, without being marked dead.
        queue = self._loops[waiter.loop]
        queue.live -= 1
        queue.dead += 1
        self._n_waiting -= 1
        waiter.dead = True

    def close(self) -> None:
        """Stop the thread after the send in progress; wake the others with ClosedResourceError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.clear()
            loops = self._loops_to_wake()
            self._wakeup.notify_all()
            thread = self._thread
        self._request_delivery(loops)
        # Let the thread drop its references (to the channel of its last job) here: if it dropped
        # the last one itself, the channel's finalizers would run in a daemon thread, which may be
        # stopped half-way by the interpreter's exit (a semaphore unlinked, never unregistered).
        if thread is not None and thread is not threading.current_thread():
            thread.join(THREAD_JOIN_TIMEOUT)
