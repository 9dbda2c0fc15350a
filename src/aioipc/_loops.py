"""Event loops: the one place that knows asyncio, uvloop and trio apart.

A :class:`LoopHandle` is a running event loop as the rest of aioipc sees it: park a coroutine
(:class:`Waiter`), wake it from any thread, yield to the loop. :func:`current_loop` finds the handle
of the running loop; :class:`FdWatch` and :func:`wait_readable` wait until a file descriptor is
readable on it. A forked child forgets the loop state it inherited (:class:`_CleanSlate`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import anyio

from . import _fork
from ._exceptions import BusyResourceError

__all__ = [
    "CHECKPOINT_ITEMS",
    "CHECKPOINT_MIN_ITEMS",
    "CHECKPOINT_SECONDS",
    "Checkpointer",
    "FdWatch",
    "LoopHandle",
    "Turns",
    "Waiter",
    "current_loop",
    "wait_readable",
]

#: A waiting coroutine yields to its loop after this many items taken without waiting, or after
#: CHECKPOINT_SECONDS, so that a fast consumer never starves the loop's other tasks: the values
#: that kept the loop's p99 lag at 1-10 ms at full speed (benchmark row "Loop responsiveness").
CHECKPOINT_ITEMS = 256
CHECKPOINT_SECONDS = 0.002
#: Below this many items the clock is not read at all, so the hottest path (the small-int
#: throughput rows) pays a counter increment per item; 32 items take well under
#: CHECKPOINT_SECONDS.
CHECKPOINT_MIN_ITEMS = 32


# --------------------------------------------------------------------------------------------
# Event loops: how to park a coroutine and how to wake it from any thread
# --------------------------------------------------------------------------------------------


class Waiter:
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

    async def park(self, waiter: Waiter, abort: Callable[[Waiter], None]) -> None:
        raise NotImplementedError

    def wake(self, waiter: Waiter) -> None:
        raise NotImplementedError

    #: Yield to the loop (a cancellation point).
    checkpoint: Callable[[], Awaitable[None]]


class _AsyncioLoop(LoopHandle):
    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: nobody is left to wake
            pass

    async def park(self, waiter: Waiter, abort: Callable[[Waiter], None]) -> None:
        future = self._loop.create_future()
        waiter.token = future
        await future

    def wake(self, waiter: Waiter) -> None:
        future: asyncio.Future[None] = waiter.token
        if not future.done():
            future.set_result(None)

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)


#: The task :func:`_asyncio_cancel_pending` looked at last, and anyio's state of that task (a
#: task's state stays the same object while it runs; looking it up costs a weak reference).
_last_task_state: tuple[Callable[[], object], object] = (lambda: None, None)


def _asyncio_cancel_pending(loop: asyncio.AbstractEventLoop) -> bool:
    """False when the task running on ``loop`` surely has no cancellation pending (a cheap look,
    so that a fast path can skip a yield to the loop)."""
    task = asyncio.current_task(loop)
    if task is None:
        return False
    # A plain asyncio cancellation not delivered yet (the task has not waited since
    # ``task.cancel()``): ``Task._must_cancel``, on the C and the Python task alike.
    if getattr(task, "_must_cancel", True):
        return True
    # An anyio cancel scope cancelled while this task ran (anyio's asyncio backend delivers
    # it at the task's next wait).
    global _last_task_state
    last_task, state = _last_task_state
    if last_task() is not task:
        anyio_asyncio = sys.modules.get("anyio._backends._asyncio")
        if anyio_asyncio is None:
            return False
        state = anyio_asyncio._task_states.get(task)
        if state is not None:  # (anyio makes a task's state when it first needs it)
            _last_task_state = (weakref.ref(task), state)
    scope = getattr(state, "cancel_scope", None)
    while scope is not None:
        if scope.cancel_called:
            return True
        if scope.shield:
            return False
        scope = scope._parent_scope
    return False


def _trio_lowlevel() -> Any:
    """``trio.lowlevel``, for a caller that runs on no asyncio loop."""
    trio = sys.modules.get("trio")
    if trio is None:
        raise RuntimeError("aioipc needs a running asyncio, uvloop or trio event loop")
    return trio.lowlevel


class _TrioLoop(LoopHandle):
    __slots__ = ("_reschedule", "_token", "checkpoint")

    def __init__(self, token: Any) -> None:
        import trio

        self._token = token
        self._reschedule = trio.lowlevel.reschedule
        self.checkpoint = trio.lowlevel.checkpoint

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        import trio

        try:
            self._token.run_sync_soon(callback)
        except trio.RunFinishedError:
            pass

    async def park(self, waiter: Waiter, abort: Callable[[Waiter], None]) -> None:
        import trio

        waiter.token = trio.lowlevel.current_task()

        def abort_fn(raise_cancel: Any) -> trio.lowlevel.Abort:
            abort(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort_fn)

    def wake(self, waiter: Waiter) -> None:
        self._reschedule(waiter.token)


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
    loop = asyncio._get_running_loop()  # None outside asyncio (no exception to raise and catch)
    if loop is not None:
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
        if self._count < CHECKPOINT_MIN_ITEMS:
            return False
        if self._count < CHECKPOINT_ITEMS and time.monotonic() - self._since < CHECKPOINT_SECONDS:
            return False
        self._count = 0
        self._since = time.monotonic()
        return True

    async def checkpoint(self) -> None:
        await current_loop().checkpoint()

    def step(self) -> Awaitable[None] | None:
        """Count one step of a fast path; return what it must await before it goes on, or None.

        That is a yield to the loop when one is due; otherwise the loop's check for a pending
        cancellation of the calling task (trio's ``checkpoint_if_cancelled``; on asyncio a yield
        if one may be pending, None if surely not). No coroutine is made unless one is needed.
        """
        loop = asyncio._get_running_loop()
        if loop is not None:
            if self.due() or _asyncio_cancel_pending(loop):
                return asyncio.sleep(0)
            return None
        lowlevel = _trio_lowlevel()
        step: Awaitable[None]
        step = lowlevel.checkpoint() if self.due() else lowlevel.checkpoint_if_cancelled()
        return step

    async def tick(self) -> None:
        """A cancellation point that also yields to the loop now and then."""
        step = self.step()
        if step is not None:
            await step

    def reset(self) -> None:
        self._count = 0
        self._since = time.monotonic()


# --------------------------------------------------------------------------------------------
# Waiting for a file descriptor to become readable
# --------------------------------------------------------------------------------------------


class Turns:
    """Coroutines of one event loop take turns at something only one may do at a time (wait on a
    private epoll for a channel's fd), first come first served.

    :attr:`busy` while a coroutine has the turn; :meth:`acquire` on another thread's loop while
    it is busy raises :class:`aioipc.BusyResourceError` with ``busy_message`` (check
    :meth:`held_elsewhere` first to go another way instead).
    """

    __slots__ = ("_busy_message", "_thread", "_waiters", "busy")

    def __init__(self, busy_message: str) -> None:
        self.busy = False
        self._busy_message = busy_message
        self._thread = 0
        self._waiters: deque[Waiter] = deque()

    def held_elsewhere(self) -> bool:
        """The turn is held on another thread's event loop."""
        return self.busy and self._thread != threading.get_ident()

    async def acquire(self) -> None:
        """Wait for the turn.

        **Cancellation**: safe; a turn given to a cancelled coroutine passes to the next.
        """
        if not self.busy:
            self.busy = True
            self._thread = threading.get_ident()
            return
        if self._thread != threading.get_ident():
            raise BusyResourceError(self._busy_message)
        loop = current_loop()
        waiter = Waiter(loop, 1)
        self._waiters.append(waiter)
        try:
            await loop.park(waiter, _abort_turn)
        except BaseException:
            if waiter.items is not None:  # the turn was given to us: pass it on
                self.release()
            else:
                waiter.dead = True
            raise

    def release(self) -> None:
        """Give the turn to the next coroutine waiting for it (it runs once this one yields)."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.dead:
                waiter.items = []
                waiter.loop.wake(waiter)
                return
        self.busy = False


def _abort_turn(waiter: Waiter) -> None:
    waiter.dead = True


class FdWatch:
    """Waits until one file descriptor is readable, on the running event loop, one waiter at a
    time.

    On asyncio (and uvloop) the watch stays registered between waits, saving two system calls per
    wait; when the fd becomes readable while nobody waits on that loop, ``on_idle(loop)`` is called
    there, and should :meth:`stop` it (or the loop would spin). On trio each wait registers anew.
    """

    __slots__ = ("_future", "_loop", "_on_idle", "fd")

    def __init__(self, fd: int, on_idle: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        self.fd = fd
        self._on_idle = on_idle
        #: The asyncio loop the fd is registered with, if any.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._future: asyncio.Future[bool] | None = None

    async def wait(self, at_most: float | None = None) -> bool:
        """Return True once the fd is readable; False if ``at_most`` seconds passed first.

        **Cancellation**: safe; the fd is not read.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            import trio

            if at_most is None:
                await trio.lowlevel.wait_readable(self.fd)
                return True
            with trio.move_on_after(at_most):
                await trio.lowlevel.wait_readable(self.fd)
                return True
            return False
        if self._loop is not loop:
            loop.add_reader(self.fd, self._on_readable, loop)
            self._loop = loop
        self._future = future = loop.create_future()
        timer = None if at_most is None else loop.call_later(at_most, _expire, future)
        try:
            return bool(await future)
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        future = self._future
        if future is not None and future.get_loop() is loop:
            if not future.done():
                future.set_result(True)
            return
        self._on_idle(loop)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread: stop watching there."""
        loop.remove_reader(self.fd)
        if self._loop is loop:
            self._loop = None

    def release(self) -> bool:
        """Stop watching, from any thread. False if a loop running on another thread still
        watches: only that loop's own callback (``on_idle``) can stop it there."""
        watcher = self._loop
        if watcher is not None and not watcher.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not watcher and watcher.is_running():
                return False
            watcher.remove_reader(self.fd)
        self._loop = None
        return True


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


async def wait_readable(fd: int) -> None:
    """Wait until ``fd`` is readable, on the running event loop; only one task of a loop may wait
    on one fd (another raises :class:`anyio.BusyResourceError`).

    The fd's blocking mode is kept: uvloop leaves a watched fd non-blocking, which this undoes.

    **Cancellation**: safe; the fd is not read.
    """
    blocking = os.get_blocking(fd)
    try:
        await anyio.wait_readable(fd)
    finally:
        if blocking and not os.get_blocking(fd):
            os.set_blocking(fd, True)


# --------------------------------------------------------------------------------------------
# Fork safety: a child forked from inside a running loop
# --------------------------------------------------------------------------------------------


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


_fork.register(_CleanSlate(), multiprocessing_children_only=True)
