"""Worker processes that coroutines can await, and the thread that notices exits nobody awaits.

:class:`Process` is a :mod:`multiprocessing` process whose exit a coroutine awaits on the process
sentinel (a file descriptor that becomes readable when the process ends) through the event loop:
no thread and no polling per process. :func:`open_process` ties a process's life to a block.

The :class:`Watcher` (one thread per process, started while something is watched, gone when
nothing is) calls back when a watched process exits, and runs periodic jobs; supervision
(``_supervision.py``) and a second waiter of a process use it. It reads exit codes without racing
the thread that owns the process object (an :class:`aioipc.Process` serialises its polls; other
processes are peeked at without reaping them).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from multiprocessing import context as mp_context
from multiprocessing.process import BaseProcess
from typing import Any, cast

import anyio

from . import _fork
from ._connection import Connection, closed_end
from ._exceptions import ProcessFailed
from ._loops import LoopHandle, current_loop, wait_readable
from ._wire import drain_wakeups

__all__ = ["Process", "Watch", "Watcher", "describe_exit", "open_process", "watcher"]

#: ``Process.wait`` first sleeps this long between looks at the exit status once the sentinel has
#: fired (the process is finishing its exit, a moment before its status can be collected),
#: doubling up to REAP_POLL_MAX: prompt without spinning (tests/test_process.py: wait returns the
#: exit code).
REAP_POLL_FIRST = 0.0005
REAP_POLL_MAX = 0.05
#: How long ``stop`` and ``open_process`` wait for a terminated process before they kill it: time
#: for a SIGTERM handler to clean up, short enough for a test's timeout (tests/test_process.py:
#: stop terminates, then kills).
TERMINATE_TIMEOUT = 5.0

#: How often the watcher thread steps its pending work (settling exit codes, checking locks).
_STEP = 0.02
#: How long a sentinel may have fired before the exit code can be read (the process is still
#: finishing its exit); after that the code is reported as unknown.
_SETTLE_LIMIT = 1.0


# --------------------------------------------------------------------------------------------
# Exit codes
# --------------------------------------------------------------------------------------------


def describe_exit(name: str, pid: int | None, exitcode: int | None) -> str:
    """``"worker (pid 42) was killed by SIGKILL"`` and the like."""
    who = f"{name} (pid {pid})"
    if exitcode is None:
        return f"{who} exited (exit code unknown)"
    if exitcode < 0:
        try:
            signame = signal.Signals(-exitcode).name
        except ValueError:
            signame = f"signal {-exitcode}"
        return f"{who} was killed by {signame} (exit code {exitcode})"
    return f"{who} exited with code {exitcode}"


def _read_exitcode(process: BaseProcess, pid: int) -> int | None:
    """The exit code of a process whose sentinel fired, or None if it cannot be read (yet).

    Called from the watcher thread, it must not race with the thread that owns the process object:
    two concurrent ``waitpid`` calls make one of them see a running process, and two concurrent
    reads of a fork-server child's status make one of them report 255. An :class:`aioipc.Process`
    serialises its polls, so its code is read as usual when its owner is not polling; for other
    multiprocessing processes the code is peeked at without reaping (not possible for fork-server
    children: their code is known only once their owner has collected it).
    """
    guard: threading.RLock | None = getattr(process, "_poll_guard", None)
    if guard is not None:
        if not guard.acquire(False):  # the owner is polling it right now
            return None
        try:
            return process.exitcode
        finally:
            guard.release()
    popen = getattr(process, "_popen", None)
    code: int | None = getattr(popen, "returncode", None)
    if code is not None or popen is None or getattr(popen, "method", None) == "forkserver":
        return code
    if not hasattr(os, "waitid"):  # macOS: the code is known once the owner has collected it
        return None
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped by the owner: its returncode is set in a moment
        return None
    if info is None:  # the sentinel fired a moment before the process became a zombie
        return None
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


# --------------------------------------------------------------------------------------------
# The watcher thread
# --------------------------------------------------------------------------------------------


class Watch:
    """One process watched by the watcher thread (which owns ``fd``, a duplicate of the sentinel,
    so that closing the process object does not pull the descriptor from under it)."""

    __slots__ = ("active", "callback", "fd", "fired", "name", "pid", "process")

    def __init__(self, process: BaseProcess, callback: Callable[[Watch, int | None], None]) -> None:
        self.process = process
        self.name = process.name
        self.pid: int = process.pid  # type: ignore[assignment]  # started: checked by the caller
        self.fd = os.dup(process.sentinel)
        self.callback = callback
        self.fired = 0.0
        self.active = True


class Watcher:
    """Waits for the sentinels of watched processes and runs periodic jobs, in one thread.

    Callbacks and jobs run in that thread and must not block for long. A job is a callable
    returning True once it is done; it is called every ``_STEP`` seconds until then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._watching: dict[int, Watch] = {}
        self._settling: list[Watch] = []
        self._jobs: list[Callable[[], bool]] = []
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    def after_fork_in_child(self) -> None:
        # The watched processes are the parent's children; so are the thread and its pipe.
        for fd in (*self._watching, *(w.fd for w in self._settling), self._wake_r, self._wake_w):
            if fd >= 0:
                with suppress(OSError):  # the parent's thread was closing it as we forked
                    os.close(fd)
        self._lock = threading.Lock()
        self._reset()

    def watch(self, process: BaseProcess, callback: Callable[[Watch, int | None], None]) -> Watch:
        """Call ``callback(watch, exitcode)`` in the watcher thread once ``process`` has exited
        (``exitcode`` None if it cannot be known)."""
        watch = Watch(process, callback)
        with self._lock:
            self._watching[watch.fd] = watch
            self._kick()
        return watch

    def cancel(self, watch: Watch) -> None:
        """Forget ``watch`` (its callback will not run, unless it is running already)."""
        with self._lock:
            watch.active = False
            if self._thread is not None:
                self._kick()

    def add_job(self, job: Callable[[], bool]) -> None:
        with self._lock:
            self._jobs.append(job)
            self._kick()

    def _kick(self) -> None:
        """Start the thread, or make it look at its work again (lock held)."""
        if self._thread is None:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._thread = threading.Thread(
                target=self._run, name="aioipc-process-watcher", daemon=True
            )
            self._thread.start()
        else:
            with suppress(BlockingIOError):  # plenty of wake-ups are pending already
                os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            with self._lock:
                for fd, watch in list(self._watching.items()):
                    if not watch.active:
                        del self._watching[fd]
                        os.close(fd)
                if not (self._watching or self._settling or self._jobs):
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                    self._reset()
                    return
                poller = select.poll()
                for fd in (self._wake_r, *self._watching):
                    poller.register(fd, select.POLLIN)
                pending = bool(self._settling or self._jobs)
                wake_r = self._wake_r
            events = poller.poll(_STEP * 1000 if pending else None)
            now = time.monotonic()
            with self._lock:
                for fd, _ in events:
                    if fd == wake_r:
                        drain_wakeups(wake_r)
                        continue
                    fired = self._watching.pop(fd, None)
                    if fired is not None:
                        fired.fired = now
                        self._settling.append(fired)
                jobs = list(self._jobs)
            self._settle(now)
            done = [job for job in jobs if job()]
            if done:
                with self._lock:
                    for job in done:
                        self._jobs.remove(job)

    def _settle(self, now: float) -> None:
        """Read the exit codes of the processes whose sentinels fired; run their callbacks."""
        for watch in list(self._settling):
            code: int | None = None
            if watch.active:
                code = _read_exitcode(watch.process, watch.pid)
                if code is None and now - watch.fired < _SETTLE_LIMIT:
                    continue
            self._settling.remove(watch)
            os.close(watch.fd)
            if watch.active:
                watch.callback(watch, code)


#: The one watcher thread of this process, shared by Process.wait (a second waiter) and supervision.
watcher = Watcher()


# --------------------------------------------------------------------------------------------
# Process
# --------------------------------------------------------------------------------------------


class Process(BaseProcess):
    """A :mod:`multiprocessing` process whose exit coroutines can await.

    It is made by ``ctx``, a multiprocessing context (default: the default context, resolved when
    the process starts, like :class:`multiprocessing.Process`), and has the whole interface of a
    multiprocessing process (``start``, ``join``, ``terminate``, ``kill``, ``exitcode``...), plus
    :meth:`wait` and :meth:`stop`. Unlike multiprocessing's, ``exitcode`` still answers after
    ``close()``.

    Use :func:`open_process` to tie a process to a block. Like any multiprocessing process, the
    target must be picklable by reference (a module-level function) under spawn and forkserver.
    """

    _closed: bool  # set by multiprocessing
    _poll_guard: threading.RLock  # set once started

    def __init__(
        self,
        group: None = None,
        target: Callable[..., object] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
        ctx: mp_context.BaseContext | None = None,
    ) -> None:
        super().__init__(group, target, name, args, kwargs or {}, daemon=daemon)
        # (every concrete context has a Process class; the base class's stub does not say so)
        self._kind: Any = mp_context.Process if ctx is None else cast(Any, ctx).Process
        self._start_method: str | None = self._kind._start_method
        self._final_exitcode: int | None = None
        self._forced: str | None = None
        self._loops_on_sentinel: set[LoopHandle] = set()

    # How multiprocessing starts the process and sets the child up: as the context's own class.
    @staticmethod
    def _Popen(process_obj: Process) -> Any:
        popen = process_obj._kind._Popen(process_obj)
        # Serialise polls (exitcode, join, is_alive, multiprocessing's own clean-up) so that the
        # watcher thread may read the exit code too (made after launch: a lock does not pickle).
        guard = process_obj._poll_guard = threading.RLock()
        poll = popen.poll

        def serialized_poll(flag: int = os.WNOHANG) -> int | None:
            with guard:
                return poll(flag)  # type: ignore[no-any-return]

        popen.poll = serialized_poll
        return popen

    def _after_fork(self) -> None:
        self._kind._after_fork()

    def __repr__(self) -> str:
        return "<aioipc." + super().__repr__()[1:]

    @property
    def exitcode(self) -> int | None:
        """The exit code: None while running, negative ``-N`` if killed by signal ``N``."""
        if self._closed:
            return self._final_exitcode
        return super().exitcode

    def close(self) -> None:
        """Release the process object's resources (its sentinel). The process must have exited;
        ``exitcode`` keeps its value."""
        if not self._closed:
            self._final_exitcode = super().exitcode
        super().close()

    async def wait(self) -> int:
        """Wait for the process to exit and return its exit code (``-N`` if signal ``N`` killed it).

        The event loop watches the process sentinel: no thread and no polling. If another task of
        the same event loop already waits on this process, the wait is served by aioipc's shared
        watcher thread instead (one thread for all processes).

        **Cancellation**: the process is not affected; waiting again later is fine.
        """
        sentinel = self.sentinel  # ValueError if the process was not started or is closed
        code = self._reap()
        if code is not None:
            await anyio.lowlevel.checkpoint()
            return code
        await self._wait_sentinel(sentinel)
        delay = REAP_POLL_FIRST
        while (code := self._reap()) is None:
            # The sentinel fires as the process closes its descriptors, a moment before its exit
            # status can be collected.
            await anyio.sleep(delay)
            delay = min(delay * 2, REAP_POLL_MAX)
        return code

    def _final_code(self) -> int:
        code = self.exitcode
        assert code is not None, "the process was awaited"
        return code

    def _reap(self) -> int | None:
        self.join(0)  # also drops the process from multiprocessing's list of children once done
        return self.exitcode

    async def _wait_sentinel(self, fd: int) -> None:
        loop = current_loop()
        if loop in self._loops_on_sentinel:  # only one task of a loop may wait on an fd
            await _wait_in_watcher(self)
            return
        self._loops_on_sentinel.add(loop)
        try:
            # (it keeps the fd blocking: multiprocessing expects the fork server's status pipe to
            # block, and uvloop leaves a watched fd non-blocking)
            await wait_readable(fd)
        except anyio.BusyResourceError:  # someone else's task of this loop waits on it
            await _wait_in_watcher(self)
        finally:
            self._loops_on_sentinel.discard(loop)

    async def stop(
        self, wait_timeout: float | None = None, *, terminate_timeout: float = TERMINATE_TIMEOUT
    ) -> int:
        """Make sure the process is over, and return its exit code.

        Wait up to ``wait_timeout`` seconds (None: as long as it takes) for it to exit; then
        :meth:`terminate` it (SIGTERM), wait up to ``terminate_timeout`` seconds, and finally
        :meth:`kill` it (SIGKILL). ``wait_timeout=0`` terminates it at once if it still runs.

        **Cancellation**: if cancelled while waiting, the process is terminated and then killed as
        above (that part is shielded from cancellation) before the cancellation propagates.
        """
        if wait_timeout is None or wait_timeout > 0:
            try:
                with anyio.move_on_after(wait_timeout):
                    return await self.wait()
            except BaseException:
                await self._force_exit(terminate_timeout)
                raise
        return await self._force_exit(terminate_timeout)

    async def _force_exit(self, terminate_timeout: float) -> int:
        with anyio.CancelScope(shield=True):
            if self.exitcode is None:
                self._forced = "terminated"
                self.terminate()
                with anyio.move_on_after(terminate_timeout):
                    await self.wait()
                if self.exitcode is None:
                    self._forced = "killed"
                    self.kill()
            await self.wait()
        return self._final_code()


async def _wait_in_watcher(process: BaseProcess) -> None:
    """Wait for ``process`` to exit through the watcher thread."""
    loop = current_loop()
    exited = anyio.Event()
    watch = watcher.watch(process, lambda _watch, _code: loop.call_soon_threadsafe(exited.set))
    try:
        await exited.wait()
    finally:
        watcher.cancel(watch)


@asynccontextmanager
async def open_process(
    target: Callable[..., object],
    *args: Any,
    ctx: mp_context.BaseContext | None = None,
    name: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    daemon: bool | None = None,
    wait_timeout: float | None = None,
    terminate_timeout: float = TERMINATE_TIMEOUT,
    close_connections: bool = True,
) -> AsyncIterator[Process]:
    """Run ``target(*args, **kwargs)`` in a new :class:`Process` for the duration of the block.

    The process is started on entry. When the block ends normally, it is awaited up to
    ``wait_timeout`` seconds (None: as long as it takes), then terminated, then killed
    ``terminate_timeout`` seconds later (:meth:`Process.stop`); if it exited with a non-zero code
    (it raised, called ``sys.exit(n)`` or was killed), :class:`aioipc.ProcessFailed` is raised.
    When the block raises (or is cancelled), the process is terminated at once (and killed if it
    does not exit within ``terminate_timeout``) and the block's exception propagates. Either way
    the process object is closed at the end, its ``exitcode`` still readable.

    If the block raises while the process had already failed on its own, the failure is not lost:
    it is added as a note to the block's exception (``__notes__``; shown in its traceback), so
    nested blocks report every failed process.

    Every :class:`aioipc.Connection` among ``args`` and the values of ``kwargs`` is closed in this
    process once the child has started (``close_connections=False`` keeps them open): the child
    has its own copy, and the other end sees EOF only once every copy of this one is closed. Under
    fork the child also inherits this process's other descriptors, the ends it does not use among
    them; it must close those itself (see :class:`aioipc.Connection`).

    To turn the death of a producer into an error rather than a hang, link it to the queue it
    feeds: ``queue.link(process)``.

    **Cancellation**: cancelling the block, or the wait at its end, terminates and then kills the
    process (shielded) before the cancellation propagates.
    """
    # An end this process closed already (an earlier open_process closed it, say) still reaches
    # the child, closed: a child given ends only to close them does not care which ones remain.
    # (Under fork the arguments are not pickled: the closed objects themselves get there.)
    if (ctx or mp_context._default_context).get_start_method() != "fork":
        args = tuple(_closed_as_stand_in(arg) for arg in args)
        if kwargs is not None:
            kwargs = {key: _closed_as_stand_in(value) for key, value in kwargs.items()}
    process = Process(target=target, args=args, kwargs=kwargs, name=name, daemon=daemon, ctx=ctx)
    process.start()
    pid = process.pid
    if close_connections:
        for arg in (*args, *(kwargs or {}).values()):
            if isinstance(arg, Connection):
                arg.close()
    try:
        yield process
    except BaseException as exc:
        code = await process.stop(0, terminate_timeout=terminate_timeout)
        process.close()
        if code != 0 and process._forced is None and not isinstance(exc, _cancelled()):
            _add_note(exc, f"while the block raised, {describe_exit(process.name, pid, code)}")
        raise
    code = await process.stop(wait_timeout, terminate_timeout=terminate_timeout)
    process.close()
    if code != 0:
        message = describe_exit(process.name, pid, code)
        if process._forced is not None:
            message += f" ({process._forced}: it had not exited {wait_timeout} s after the block)"
        raise ProcessFailed(message, code)


class _ClosedEnd:
    """Pickles a closed :class:`aioipc.Connection` into a closed one in the child."""

    def __reduce__(self) -> tuple[Callable[[], Connection[Any, Any]], tuple[()]]:
        return closed_end, ()


def _closed_as_stand_in(value: Any) -> Any:
    """``value``, with the closed connections in it (itself, or items of a list or tuple)
    replaced by stand-ins that pickle."""
    if isinstance(value, Connection):
        return _ClosedEnd() if value.closed else value
    if type(value) in (list, tuple) and any(
        isinstance(item, Connection) and item.closed for item in value
    ):
        return type(value)(_closed_as_stand_in(item) for item in value)
    return value


def _cancelled() -> type[BaseException]:
    try:
        return anyio.get_cancelled_exc_class()
    except Exception:  # no async library running (cannot happen in a coroutine)
        return type(None)  # type: ignore[return-value]


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10 (where tracebacks show ``__notes__`` once the
    exceptiongroup backport is imported, as anyio does)."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:
        notes = getattr(exc, "__notes__", None)
        if notes is None:
            notes = []
            exc.__notes__ = notes  # type: ignore[attr-defined]
        notes.append(note)


def _after_fork_in_child() -> None:
    # The watched processes, the thread and its pipe are the parent's.
    watcher.after_fork_in_child()


_fork.register(_after_fork_in_child)
