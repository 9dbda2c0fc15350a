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

import asyncio
import copy
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing import util
from typing import Any, Generic, NoReturn, Protocol, TypeVar

from ._exceptions import ClosedResourceError

T = TypeVar("T")
R = TypeVar("R")

#: A waiting coroutine yields to its loop after this many items taken without waiting, or after
#: CHECKPOINT_SECONDS, so that a fast consumer never starves the loop's other tasks.
CHECKPOINT_ITEMS = 256
CHECKPOINT_SECONDS = 0.002


# --------------------------------------------------------------------------------------------
# Event loops: how to park a coroutine and how to wake it from any thread
# --------------------------------------------------------------------------------------------


class _Waiter:
    """One parked coroutine. ``items``/``error`` are set on its loop's thread, right before waking.

    ``dead`` means the waiter left its FIFO (abandoned, or served): it no longer counts as waiting.
    """

    __slots__ = ("dead", "error", "items", "loop", "token", "want")

    def __init__(self, loop: LoopHandle, want: int) -> None:
        self.loop = loop
        self.want = want
        self.items: list[Any] | None = None
        self.error: BaseException | None = None
        self.dead = False
        self.token: Any = None

    def raise_error(self) -> NoReturn:
        """Raise ``error`` and let go of it, so that no reference cycle (frame, exception,
        traceback, frame) keeps this waiter's channel, and its semaphores, alive until the cycle
        collector runs (on Python 3.13 a semaphore finalised by the collector inside the resource
        tracker's own call is reported as leaked)."""
        error, self.error = self.error, None
        assert error is not None
        try:
            raise error
        finally:
            del error


class LoopHandle:
    """One running event loop, as seen from the bridge."""

    __slots__ = ("__weakref__",)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    async def park(self, waiter: _Waiter, abort: Callable[[_Waiter], None]) -> None:
        raise NotImplementedError

    def wake(self, waiter: _Waiter) -> None:
        raise NotImplementedError

    async def checkpoint(self) -> None:
        raise NotImplementedError

    async def checkpoint_if_cancelled(self) -> None:
        """Raise the cancellation of the calling task if one is pending; else return at once."""
        raise NotImplementedError

    def maybe_cancelled(self) -> bool:
        """False when the calling task surely has no cancellation pending (a cheap look, so that
        a fast path can skip :meth:`checkpoint_if_cancelled`)."""
        return True


class _AsyncioLoop(LoopHandle):
    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody is left to wake
            pass

    async def park(self, waiter: _Waiter, abort: Callable[[_Waiter], None]) -> None:
        future = self._loop.create_future()
        waiter.token = future
        await future

    def wake(self, waiter: _Waiter) -> None:
        future: asyncio.Future[None] = waiter.token
        if not future.done():
            future.set_result(None)

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)

    async def checkpoint_if_cancelled(self) -> None:
        if self.maybe_cancelled():
            await asyncio.sleep(0)

    def maybe_cancelled(self) -> bool:
        task = asyncio.current_task(self._loop)
        if task is None:
            return False
        # A plain asyncio cancellation not delivered yet (the task has not waited since
        # ``task.cancel()``): ``Task._must_cancel``, on the C and the Python task alike.
        if getattr(task, "_must_cancel", True):
            return True
        # An anyio cancel scope cancelled while this task ran (anyio's asyncio backend delivers
        # it at the task's next wait).
        anyio_asyncio = sys.modules.get("anyio._backends._asyncio")
        if anyio_asyncio is None:
            return False
        state = anyio_asyncio._task_states.get(task)
        scope = getattr(state, "cancel_scope", None)
        while scope is not None:
            if scope.cancel_called:
                return True
            if scope.shield:
                return False
            scope = scope._parent_scope
        return False


class _TrioLoop(LoopHandle):
    __slots__ = ("_token",)

    def __init__(self, token: Any) -> None:
        self._token = token

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        import trio

        try:
            self._token.run_sync_soon(callback)
        except trio.RunFinishedError:
            pass

    async def park(self, waiter: _Waiter, abort: Callable[[_Waiter], None]) -> None:
        import trio

        waiter.token = trio.lowlevel.current_task()

        def abort_fn(raise_cancel: Any) -> trio.lowlevel.Abort:
            abort(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort_fn)

    def wake(self, waiter: _Waiter) -> None:
        import trio

        trio.lowlevel.reschedule(waiter.token)

    async def checkpoint(self) -> None:
        import trio

        await trio.lowlevel.checkpoint()

    async def checkpoint_if_cancelled(self) -> None:
        import trio

        await trio.lowlevel.checkpoint_if_cancelled()


_asyncio_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncioLoop] = (
    weakref.WeakKeyDictionary()
)
_trio_loop_var: Any = None


#: The asyncio loop seen last and its handle: most programs have one loop, and a weak dictionary
#: look-up costs a weak reference per call.
_last_asyncio: tuple[object, _AsyncioLoop | None] = (None, None)


def current_loop() -> LoopHandle:
    """The handle of the running event loop (asyncio, uvloop or trio)."""
    global _last_asyncio
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        last, handle = _last_asyncio
        if last is loop and handle is not None:
            return handle
        handle = _asyncio_loops.get(loop)
        if handle is None:
            handle = _asyncio_loops[loop] = _AsyncioLoop(loop)
        _last_asyncio = (loop, handle)
        return handle
    trio_handle = _current_trio_loop()
    if trio_handle is not None:
        return trio_handle
    raise RuntimeError("aioipc needs a running asyncio, uvloop or trio event loop")


def _current_trio_loop() -> LoopHandle | None:
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    global _trio_loop_var
    if _trio_loop_var is None:
        _trio_loop_var = trio.lowlevel.RunVar("aioipc_loop")
    try:
        handle: LoopHandle | None = _trio_loop_var.get(None)
    except RuntimeError:  # not inside trio.run()
        return None
    if handle is None:
        handle = _TrioLoop(trio.lowlevel.current_trio_token())
        _trio_loop_var.set(handle)
    return handle


class Checkpointer:
    """Counts work done without waiting, so that a fast path yields to the loop now and then.

    Hot paths call ``if checkpoints.due(): await checkpoints.checkpoint()``; :meth:`tick` does both.
    """

    __slots__ = ("_count", "_since")

    def __init__(self) -> None:
        self._count = 0
        self._since = time.monotonic()

    def due(self) -> bool:
        """Count one step; True when the caller should yield to its event loop now."""
        self._count += 1
        if self._count < 32:
            return False
        if self._count < CHECKPOINT_ITEMS and time.monotonic() - self._since < CHECKPOINT_SECONDS:
            return False
        self._count = 0
        self._since = time.monotonic()
        return True

    async def checkpoint(self) -> None:
        await current_loop().checkpoint()

    async def tick(self) -> None:
        """A cancellation point that also yields to the loop now and then."""
        loop = current_loop()
        if self.due():
            await loop.checkpoint()
        elif loop.maybe_cancelled():
            await loop.checkpoint_if_cancelled()

    def reset(self) -> None:
        self._count = 0
        self._since = time.monotonic()


# --------------------------------------------------------------------------------------------
# Fork safety: every live hub forgets its threads in a forked child
# --------------------------------------------------------------------------------------------

_live_hubs: weakref.WeakSet[_Hub] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for hub in list(_live_hubs):
        hub._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _CleanSlate:
    """Clears the event-loop state a child inherits when multiprocessing forks it from inside a
    running loop, so the child can start its own (``asyncio.run``, ``trio.run``, ``anyio.run``)
    and behaves as a plain Python process until it does.

    It runs in children that multiprocessing starts with the fork method, and only there (it is a
    multiprocessing after-fork hook): such a child never returns into the parent's loop.

    The signal handlers the loop installed are restored to Python's defaults: SIGINT to
    :func:`signal.default_int_handler` (one Ctrl-C raises ``KeyboardInterrupt`` in the child),
    others to ``SIG_DFL``. The parent's loop handlers would otherwise only poke a loop that does not
    run in the child (asyncio's runner, uvloop's, trio's KeyboardInterrupt manager, and handlers
    added with ``loop.add_signal_handler``), so the child would ignore the signal. Handlers the
    application installed itself are kept.
    """

    #: Handlers defined in these packages belong to an event loop.
    LOOP_PACKAGES = ("asyncio", "uvloop", "trio", "anyio")

    def __call__(self) -> None:
        asyncio.events._set_running_loop(None)
        trio_run = sys.modules.get("trio._core._run")
        if trio_run is not None:
            vars(trio_run.GLOBAL_RUN_CONTEXT).clear()
        sniffio = sys.modules.get("sniffio")
        if sniffio is not None:  # anyio.run() refuses to start while sniffio names a library
            sniffio.thread_local.name = None
            sniffio.current_async_library_cvar.set(None)
        if threading.current_thread() is threading.main_thread():
            import signal

            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            self._restore_signal_handlers(signal)

    @classmethod
    def _restore_signal_handlers(cls, signal: Any) -> None:
        for signum in signal.valid_signals():
            try:
                handler = signal.getsignal(signum)
            except (OSError, ValueError):
                continue
            if signum == signal.SIGINT:
                if cls._is_loop_handler(handler):
                    handler = signal.default_int_handler
                if handler is not None:
                    # Set it again even if unchanged: a loop may have replaced Python's own C-level
                    # handler behind the signal module's back.
                    signal.signal(signum, handler)
            elif cls._is_loop_handler(handler):
                signal.signal(signum, signal.SIG_DFL)

    @classmethod
    def _is_loop_handler(cls, handler: object) -> bool:
        import functools

        while isinstance(handler, functools.partial):
            handler = handler.func
        handler = getattr(handler, "__func__", handler)  # a bound method: its function
        module = getattr(handler, "__module__", None)
        if not isinstance(module, str):
            return False
        return module.partition(".")[0] in cls.LOOP_PACKAGES


_clean_slate = _CleanSlate()
util.register_after_fork(_clean_slate, lambda hook: hook())


class _WaiterQueue:
    """One hub's waiters on one event loop, FIFO. Abandoned waiters are skipped lazily."""

    __slots__ = ("dead", "delivery_pending", "live", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[_Waiter] = deque()
        self.live = 0
        self.dead = 0
        #: A wake-up of the loop is scheduled and has not run yet (coalesces wake-ups).
        self.delivery_pending = False

    def append(self, waiter: _Waiter) -> None:
        self.waiters.append(waiter)
        self.live += 1

    def popleft(self) -> _Waiter | None:
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

    def discard(self, waiter: _Waiter) -> None:
        waiter.dead = True
        self.live -= 1
        self.dead += 1
        if self.dead > 64 and self.dead > self.live:
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

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._loops.get(waiter.loop)
        if queue is None:
            queue = self._loops[waiter.loop] = _WaiterQueue()
        queue.append(waiter)
        self._n_waiting += 1

    def _discard(self, waiter: _Waiter) -> None:
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

    def close(self) -> None:
        """Release what the source holds in this process (called once the reader stops)."""
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
        max_batch: int = 256,
        max_batch_bytes: int = 1024 * 1024,
    ) -> None:
        self._source = source
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
            waiter = _Waiter(loop, want)
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

    def _abandon(self, waiter: _Waiter) -> None:
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
                _drain(wake_r)
                continue
            with self._lock:
                self._reading = False
                if self._closed:  # closed while we read: the items go back where they came from
                    self._giveback(items)
                    return
                self._owed = max(self._owed - len(items), 0)
                self.buffer.extend(items)
                if end is not None:
                    self._end = end
                    self._buffer_ended()
                loops = self._loops_to_wake()
            self._request_delivery(loops)

    def _buffer_ended(self) -> None:
        """The source ended: let it drop what the buffer holds if the end says so (lock held)."""
        ending = getattr(self._source, "ending", None)
        if ending is not None:
            kept = ending(list(self.buffer))
            if len(kept) != len(self.buffer):
                self.buffer = deque(kept)

    def _wait_for_demand(self) -> int:
        """Block until coroutines want items; how many to read (0: the reader is done)."""
        with self._lock:
            while not self._closed and self._end is None and self._demand() <= 0:
                self._wakeup.wait()
            if self._closed or self._end is not None:
                return 0
            self._reading = True
            return min(max(self._demand(), 1), self._max_batch)

    def _giveback(self, items: list[T]) -> None:
        giveback = getattr(self._source, "giveback", None)
        if giveback is not None and items:
            giveback(items)

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
            thread.join(1.0)
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


def _drain(fd: int) -> None:
    try:
        os.read(fd, 4096)
    except OSError:
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
        waiter: _Waiter,
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
            tuple[_Waiter, Any, BaseException | None, Callable[[Any], object] | None]
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
            waiter = _Waiter(loop, 1)
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

    def _abandon(self, waiter: _Waiter) -> None:
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

    def _discard_delivered(self, waiter: _Waiter) -> None:
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
            thread.join(1.0)


# --------------------------------------------------------------------------------------------
# The life cycle every aioipc object shares
# --------------------------------------------------------------------------------------------

_R = TypeVar("_R", bound="AsyncResource")


class AsyncResource:
    """``close()`` (sync, idempotent), ``aclose()`` and ``async with``; use after close raises
    :class:`aioipc.ClosedResourceError`. Subclasses implement :meth:`close` and set ``_closed``."""

    _closed: bool

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close it, as :meth:`close` does.

        **Cancellation**: none needed; it closes at once, without waiting.
        """
        self.close()

    async def __aenter__(self: _R) -> _R:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self!r} was closed in this process")
