"""``aioipc.open_pool``: long-lived worker processes that coroutines hand jobs to.

Each worker has its own duplex pipe to the pool and nothing else in common with the other workers.
The pool sends a worker a few jobs ahead (``prefetch``), so that it never waits for the next one;
the worker runs them in the order they came and answers each one at once. Before it runs a job, it
writes the job's id into its slot of a small shared array (a store in shared memory: no message,
no wake-up of the pool). That makes a worker's death exact: the job in its slot, if not answered,
is the one it was running, and only that job fails (with :class:`aioipc.WorkerDied`); the other
jobs it held never started and go back to the front of the pool's queue. Death shows as the end of
the worker's pipe (the kernel closes it with the process), then the process sentinel gives its exit
code.

One task at a time reads a worker's pipe. While a job is all its worker holds, the caller waiting
for it reads its answer itself: no other task wakes up on its way back. While the worker holds
more, the pool's receiving task for that worker reads the answers and wakes their callers; an idle
worker's pipe is watched for its end alone, so that a worker that dies idle is replaced at once.

A caller that stops waiting (cancelled, timed out) marks its job abandoned: a job still in the
pool's queue is dropped; a job already sent to a worker is withdrawn with a note on the pipe, which
the worker reads before it starts its next job; a job already running runs to its end and its
result is dropped.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from multiprocessing import connection as mpc
from multiprocessing import context as mp_context
from multiprocessing.reduction import ForkingPickler
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from ._connection import HAVE_READINESS, Connection
from ._exceptions import (
    BrokenResourceError,
    ClosedResourceError,
    RemoteError,
    RemoteTraceback,
    WorkerDied,
)
from ._process import Process, describe_exit

__all__ = ["Pool", "PoolMap", "open_pool"]

T = TypeVar("T")
R = TypeVar("R")

# What a worker answers for a job.
_OK, _RAISED, _SKIPPED, _INIT_FAILED = 0, 1, 2, 3

#: Messages to a worker up to this size are written on the spot when its pipe has room (a Unix
#: socket pair then takes them whole); larger ones go through the connection's writer thread.
_INLINE_SEND_MAX = 16 * 1024
#: How long a worker whose pipe ended may take to exit before it is killed.
_EXIT_GRACE = 1.0
#: Callers read their own answers where the loop waits on the worker's pipe itself (epoll); where
#: a reader thread serves the pipe, the pool's receiving task reads every answer.
_DIRECT = HAVE_READINESS
_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0)


def _dumps(obj: object) -> bytes:
    return bytes(ForkingPickler.dumps(obj))


# The wire, in frames of multiprocessing's format. To a worker: how many jobs and withdrawals, the
# ids of the jobs withdrawn, then each job: its id, its length and its pickled (fn, args, kwargs).
# From a worker: the job's id and what became of it, then the pickled result (or error details).
# No pickle around pickles: each side unpickles only what is the user's.
_COUNTS = struct.Struct("!II")
_ID = struct.Struct("!q")
_JOB = struct.Struct("!qI")
_ANSWER = struct.Struct("!qB")


def _encode_jobs(jobs: list[tuple[int, bytes]], withdrawn: list[int]) -> bytes:
    parts = [_COUNTS.pack(len(jobs), len(withdrawn))]
    parts += [_ID.pack(job_id) for job_id in withdrawn]
    for job_id, payload in jobs:
        parts += [_JOB.pack(job_id, len(payload)), payload]
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    text = str(exc)
    return f"{name}: {text}" if text else name


def _outcome(job_id: int, payload: memoryview) -> bytes:
    """Run one job; the answer to send for it."""
    try:
        fn, args, kwargs = ForkingPickler.loads(payload)
        result = fn(*args, **kwargs)
    except Exception as exc:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            pickled: bytes | None = _dumps(exc)
        except Exception as why:
            pickled = None
            tb += f"\n(the exception could not be pickled: {_describe(why)})"
        return _ANSWER.pack(job_id, _RAISED) + _dumps((pickled, tb, _describe(exc)))
    try:
        return _ANSWER.pack(job_id, _OK) + _dumps(result)
    except Exception as why:
        tb = "".join(traceback.format_exception(type(why), why, why.__traceback__))
        what = f"the result of type {type(result).__name__} could not be pickled: {_describe(why)}"
        return _ANSWER.pack(job_id, _RAISED) + _dumps((None, tb, what))


class _Inbox:
    """The worker's side of its pipe: jobs received and not run yet, in order."""

    def __init__(self, conn: mpc.Connection) -> None:
        self.conn = conn
        self.order: deque[int] = deque()
        self.payloads: dict[int, memoryview | None] = {}  # None: withdrawn
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)

    def take(self, message: bytes) -> None:
        n_jobs, n_withdrawn = _COUNTS.unpack_from(message)
        at = _COUNTS.size
        withdrawn = []
        for _ in range(n_withdrawn):
            withdrawn.append(_ID.unpack_from(message, at)[0])
            at += _ID.size
        view = memoryview(message)
        for _ in range(n_jobs):
            job_id, size = _JOB.unpack_from(message, at)
            at += _JOB.size
            self.order.append(job_id)
            self.payloads[job_id] = view[at : at + size]
            at += size
        for job_id in withdrawn:
            if job_id in self.payloads:
                self.payloads[job_id] = None

    def take_arrived(self) -> None:
        """Read the messages already there, without waiting (EOFError at the end of the pipe)."""
        while self.poller.poll(0):
            self.take(self.conn.recv_bytes())


def _serve(
    conn: mpc.Connection,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    max_jobs: int | None,
    inherited: list[int],
    started: Any,
    slot: int,
) -> None:
    """The worker's main loop: read jobs (and withdrawals), run them in order, answer each.

    Before running a job, the worker writes its id into ``started[slot]``: so the pool knows which
    job a dead worker was running, and that the others never started.
    """
    # Under fork this process got a copy of the pool's end of every worker's pipe: drop them, or
    # those pipes would not end when the pool's process does.
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    # The pool decides when its workers end; a terminal's Ctrl-C is for the pool's process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        try:
            initializer(*initargs)
        except Exception as exc:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            conn.send_bytes(_ANSWER.pack(-1, _INIT_FAILED) + _dumps((_describe(exc), tb)))
            sys.exit(1)
    inbox = _Inbox(conn)
    done = 0
    try:
        while True:
            inbox.take_arrived()
            while not inbox.order:
                inbox.take(conn.recv_bytes())
            job_id = inbox.order.popleft()
            payload = inbox.payloads.pop(job_id)
            if payload is None:
                answer = _ANSWER.pack(job_id, _SKIPPED)
            else:
                started[slot] = job_id
                answer = _outcome(job_id, payload)
                del payload
            conn.send_bytes(answer)
            done += 1
            if max_jobs is not None and done >= max_jobs:
                return
    except EOFError:  # the pool closed its end: it is done with this worker
        return


# --------------------------------------------------------------------------------------------
# The pool's side
# --------------------------------------------------------------------------------------------


class _Job:
    __slots__ = (
        "abandoned",
        "done",
        "error",
        "id",
        "payload",
        "reading",
        "result",
        "settled",
        "worker",
    )

    def __init__(self, job_id: int, payload: bytes) -> None:
        self.id = job_id
        self.payload: bytes | None = payload
        #: The worker holding it (None while it waits in the pool's queue).
        self.worker: _Worker | None = None
        self.settled = False
        #: Made when its caller has to wait for another task to settle it.
        self.done: anyio.Event | None = None
        #: The cancel scope of its caller's read of its worker's pipe, while it reads.
        self.reading: anyio.CancelScope | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


class _Worker:
    """A worker process as the pool sees it."""

    def __init__(self, process: Process, conn: Connection[Any, Any], depth: int, slot: int) -> None:
        self.process = process
        self.slot = slot
        self.pid = process.pid
        self.conn = conn
        self.depth = depth
        #: Jobs given to this worker and not answered, in the order it runs them.
        self.held: dict[int, _Job] = {}
        #: Jobs given to it, not sent yet; jobs to withdraw.
        self.outbox: list[_Job] = []
        self.withdrawn: list[int] = []
        self.wake = anyio.Event()
        self.given = 0
        self.alive = True
        self.sending = False
        self.backlog: bytes | None = None
        self._out = select.poll()
        self._out.register(conn.fileno(), select.POLLOUT)
        # Who reads the worker's pipe: the pool's receiving task, the caller of its only job, or
        # (idle) nobody: the receiving task then watches for the end of the pipe alone.
        self.pool_reads = not _DIRECT
        self.reader: _Job | None = None
        #: The receiving task's wait while it does not read, to cancel when it is its turn.
        self.parked: anyio.CancelScope | None = None
        #: True once the pipe's end was seen (while a caller read it).
        self.hung_up = False
        self.hangup: Any = None  # an epoll that reports only the end of the pipe

    def give_to_pool(self) -> None:
        """The receiving task reads the pipe from now on."""
        self.pool_reads = True
        if self.parked is not None:
            self.parked.cancel()

    def writable(self) -> bool:
        return bool(self._out.poll(0))

    def room(self, max_jobs: int | None) -> int:
        room = self.depth - len(self.held)
        if max_jobs is not None:
            room = min(room, max_jobs - self.given)
        return room


class Pool:
    """Worker processes that run jobs for coroutines; made by :func:`aioipc.open_pool`.

    ``await pool.run(fn, *args)`` runs ``fn(*args)`` in a worker and returns its result (or
    raises its exception); ``pool.map(fn, iterable)`` iterates over the results in order. A worker
    that dies fails only the job it was running, with :class:`aioipc.WorkerDied`, and is replaced.
    """

    def __init__(
        self,
        processes: int | None = None,
        *,
        ctx: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        max_jobs_per_worker: int | None = None,
        prefetch: int = 2,
        stop_timeout: float = 5.0,
    ) -> None:
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("processes must be at least 1")
        if max_jobs_per_worker is not None and max_jobs_per_worker < 1:
            raise ValueError("max_jobs_per_worker must be at least 1 (or None)")
        if prefetch < 0:
            raise ValueError("prefetch must be at least 0")
        self._processes = processes
        self._ctx: Any = mp_context._default_context if ctx is None else ctx
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_jobs = max_jobs_per_worker
        self._depth = prefetch + 1
        self._stop_timeout = stop_timeout
        self._workers: list[_Worker] = []
        self._pending: deque[_Job] = deque()
        self._next_id = 0
        self._live = 0  # jobs whose callers still wait
        self._idle: anyio.Event | None = None
        self._started = 0
        self._state = "new"  # new, open, closing, closed
        self._broken: str | None = None
        self._tg: TaskGroup | None = None
        #: The id of the job each worker slot started last (shared with the workers).
        self._started_ids: Any = None

    def __repr__(self) -> str:
        return (
            f"<aioipc.Pool {self._state} processes={self._processes} "
            f"pending={len(self._pending)} at {id(self):#x}>"
        )

    @property
    def processes(self) -> int:
        """The number of worker processes the pool keeps running."""
        return self._processes

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now (a replacement shows once started)."""
        return [w.pid for w in self._workers if w.alive and w.pid is not None]

    # -- life cycle --

    async def __aenter__(self) -> Pool:
        """Start the workers (their start is not awaited: the first jobs wait for them).

        **Cancellation**: nothing to cancel; it returns at once.
        """
        if self._state != "new":
            raise RuntimeError("a pool can be entered only once")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._state = "open"
        try:
            self._started_ids = self._ctx.RawArray("q", self._processes)
            for slot in range(self._processes):
                self._start_worker(slot)
        except BaseException:
            await self._shut(abort=True)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the pool: after the jobs callers still wait for when the block ended normally, at
        once when it raised (see :func:`aioipc.open_pool`).

        **Cancellation**: cancelled while waiting for those jobs, it terminates the workers as if
        the block had raised (that part is shielded), then the cancellation propagates.
        """
        await self._shut(abort=exc is not None)

    async def _shut(self, *, abort: bool) -> None:
        assert self._tg is not None
        try:
            if not abort and self._state == "open":
                self._state = "closing"
                try:
                    while self._live:
                        self._idle = anyio.Event()
                        await self._idle.wait()
                except BaseException:
                    abort = True
                    raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_workers(abort=abort)
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)

    async def _stop_workers(self, *, abort: bool) -> None:
        self._state = "closed"
        error = ClosedResourceError("the pool was closed before the job finished")
        for job in self._pending:
            self._settle(job, error=error)
        self._pending.clear()
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.alive = False
            for job in worker.held.values():
                self._settle(job, error=error)
            if abort or worker.held:  # what it still runs, nobody waits for
                worker.process.terminate()
            worker.conn.close()  # the worker reads the end of its pipe and exits
        for worker in workers:
            await worker.process.stop(self._stop_timeout)
            worker.process.close()

    def _start_worker(self, slot: int) -> None:
        assert self._started_ids is not None
        self._started_ids[slot] = 0  # job ids start at 1
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        self._started += 1
        inherited = []
        if self._ctx.get_start_method() == "fork":
            inherited = [parent_end.fileno(), *(w.conn.fileno() for w in self._workers)]
        process = Process(
            target=_serve,
            args=(
                child_end,
                self._initializer,
                self._initargs,
                self._max_jobs,
                inherited,
                self._started_ids,
                slot,
            ),
            name=f"aioipc-pool-worker-{self._started}",
            ctx=self._ctx,
        )
        try:
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()  # the child's copy is the only one left: its death ends the pipe
        worker = _Worker(process, Connection.wrap(parent_end), self._depth, slot)
        self._workers.append(worker)
        assert self._tg is not None
        self._tg.start_soon(self._receive, worker, name=f"{process.name} receiver")
        self._tg.start_soon(self._send, worker, name=f"{process.name} sender")
        self._dispatch()

    # -- talking to a worker --

    def _flush(self, worker: _Worker) -> None:
        """Send the worker the jobs given to it and the withdrawals, in one message: on the spot
        when it is small and the pipe has room (no task switch), else through its sender task."""
        if worker.sending or not worker.alive or not (worker.outbox or worker.withdrawn):
            return
        jobs = []
        for job in worker.outbox:
            if job.abandoned:  # never sent: the worker will not answer for it
                del worker.held[job.id]
            else:
                jobs.append(job)
        withdrawn = worker.withdrawn
        worker.outbox, worker.withdrawn = [], []
        if not jobs and not withdrawn:
            self._dispatch()
            return
        data = _encode_jobs([(job.id, job.payload or b"") for job in jobs], withdrawn)
        if len(data) <= _INLINE_SEND_MAX and worker.writable():
            try:
                worker.conn.sync.send_bytes(data)
            except OSError:
                return  # it died: its receiver sees the end of the pipe; the jobs were not sent
        else:
            worker.sending = True
            worker.backlog = data
            worker.wake.set()

    async def _send(self, worker: _Worker) -> None:
        """Send the large messages (or those the pipe has no room for) for ``_flush``."""
        while True:
            await worker.wake.wait()
            worker.wake = anyio.Event()
            data = worker.backlog
            if data is None:
                continue
            try:
                await worker.conn.send_bytes(data)
            except (OSError, anyio.ClosedResourceError):
                return  # it died: its receiver sees the end of the pipe; the jobs were not sent
            worker.backlog = None
            worker.sending = False
            self._flush(worker)

    async def _receive(self, worker: _Worker) -> None:
        """Hand the worker's answers to the callers while the pool reads its pipe; on the end of
        the pipe, bury it."""
        try:
            try:
                while True:
                    if not worker.pool_reads:
                        await self._park(worker)
                    self._take(worker, await worker.conn.recv_bytes())
                    if not worker.held and not worker.hung_up and _DIRECT:
                        worker.pool_reads = False  # idle: its next caller reads its own answer
            finally:
                if worker.hangup is not None:
                    worker.hangup.close()
        except anyio.ClosedResourceError:
            return  # the pool closed it
        except (EOFError, OSError):
            pass  # the end of the pipe (or a reset: the same)
        if worker.alive:
            await self._bury(worker)

    async def _park(self, worker: _Worker) -> None:
        """Wait until the pool is to read the worker's pipe: a caller handed it over, or the pipe
        ended while nobody read it."""
        if worker.hangup is None:
            worker.hangup = select.epoll()
            worker.hangup.register(worker.conn.fileno(), _EPOLLRDHUP)
        while not worker.pool_reads:
            with anyio.CancelScope() as scope:
                worker.parked = scope
                try:
                    if worker.hung_up:  # a caller reads: it hands the pipe over when it is done
                        await anyio.sleep_forever()
                    else:
                        await anyio.wait_readable(worker.hangup.fileno())
                finally:
                    worker.parked = None
            if not scope.cancel_called:  # the end of the pipe
                worker.hung_up = True
                if worker.reader is None:
                    worker.pool_reads = True

    def _take(self, worker: _Worker, frame: bytes) -> None:
        """Settle the job that the worker's answer is for."""
        job_id, status = _ANSWER.unpack_from(frame)
        data = frame[_ANSWER.size :]
        if status == _INIT_FAILED:
            self._break(worker, *ForkingPickler.loads(data))
            return
        job = worker.held.pop(job_id, None)
        if job is not None:  # else failed already (the pool broke)
            job.payload = None
            self._answered(job, status, data)
        if self._pending:
            self._dispatch()

    async def _read_answer(self, worker: _Worker, job: _Job) -> None:
        """In the caller's task, which alone reads the worker's pipe now: read the worker's
        answers until the job's own, then hand the pipe back (to the pool's receiving task if
        the worker holds other jobs, or its pipe ended). Another task that settles the job (the
        pool breaks, or closes) cancels this read."""
        with anyio.CancelScope() as scope:
            job.reading = scope
            try:
                while not job.settled:
                    frame = await worker.conn.recv_bytes()
                    if _ID.unpack_from(frame)[0] == job.id:
                        job.reading = None  # settled here: nothing to cancel
                    self._take(worker, frame)
            except (EOFError, OSError, anyio.ClosedResourceError):
                pass  # the pipe ended (the receiving task buries the worker) or the pool closed it
            finally:
                job.reading = None
                if worker.reader is job:
                    worker.reader = None
                    if worker.alive and (worker.held or worker.hung_up):
                        worker.give_to_pool()

    def _answered(self, job: _Job, status: int, data: Any) -> None:
        if job.abandoned:
            return
        if status == _OK:
            try:
                result = ForkingPickler.loads(data)
            except Exception as exc:
                self._settle(
                    job,
                    error=RemoteError(f"the job's result could not be unpickled: {_describe(exc)}"),
                )
            else:
                self._settle(job, result=result)
            return
        pickled, tb, description = ForkingPickler.loads(data)
        error: BaseException
        if pickled is None:
            error = RemoteError(description)
        else:
            try:
                error = ForkingPickler.loads(pickled)
            except Exception as exc:
                error = RemoteError(f"{description} (the exception could not be unpickled here: "
                                    f"{_describe(exc)})")  # fmt: skip
        error.__cause__ = RemoteTraceback(tb)
        self._settle(job, error=error)

    def _break(self, worker: _Worker, description: str, tb: str) -> None:
        """The initializer raised: the pool cannot run anything."""
        self._broken = (
            f"the pool's initializer raised in {worker.process.name} (pid {worker.pid}): "
            f"{description}\n{tb}"
        )
        error = BrokenResourceError(self._broken)
        for job in [*self._pending, *(j for w in self._workers for j in w.held.values())]:
            self._settle(job, error=error)
        self._pending.clear()
        for other in self._workers:
            other.held.clear()

    async def _bury(self, worker: _Worker) -> None:
        """The worker's pipe ended: fail the job it was running, requeue those it had not
        started, start a replacement."""
        worker.alive = False
        self._workers.remove(worker)
        worker.conn.close()
        with anyio.CancelScope(shield=True):  # never leave it unreaped
            with anyio.move_on_after(_EXIT_GRACE):
                await worker.process.wait()
            if worker.process.exitcode is None:  # it closed its pipe but lives on
                worker.process.kill()
                await worker.process.wait()
        code = worker.process.exitcode
        worker.process.close()
        assert self._started_ids is not None
        running = worker.held.pop(self._started_ids[worker.slot], None)  # if not answered
        unsent = list(worker.held.values())  # never started: they go back to the queue
        worker.held.clear()
        if running is not None:
            message = describe_exit(worker.process.name, worker.pid, code)
            self._settle(
                running,
                error=WorkerDied(
                    f"the pool worker running the job died: {message}",
                    worker.process.name,
                    worker.pid,
                    code,
                ),
            )
        if self._state == "closed":  # the pool ended while this worker was being buried
            for job in unsent:
                self._settle(
                    job, error=ClosedResourceError("the pool was closed before the job finished")
                )
            return
        for job in reversed(unsent):
            if not job.abandoned:
                job.worker = None
                self._pending.appendleft(job)
        if self._state in ("open", "closing") and self._broken is None:
            self._start_worker(worker.slot)
        else:
            self._dispatch()

    # -- jobs --

    def _check_open(self) -> None:
        if self._broken is not None:
            raise BrokenResourceError(self._broken)
        if self._state != "open":
            if self._state == "new":
                raise RuntimeError("the pool is not open: use it in `async with`")
            raise ClosedResourceError("the pool is closed")

    def _submit(
        self,
        fn: Callable[..., object],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        waits: bool = False,
    ) -> _Job:
        self._check_open()
        try:
            payload = _dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"cannot send the job to a worker: {_describe(exc)}") from None
        self._next_id += 1
        job = _Job(self._next_id, payload)
        self._live += 1
        self._pending.append(job)
        self._dispatch(job if waits else None)
        return job

    def _dispatch(self, waiter: _Job | None = None) -> None:
        """Give pending jobs to the workers with room: the least loaded first.

        ``waiter``: a job whose caller goes on to wait for it at once; if it is all its worker
        holds, the caller reads the answer itself. Otherwise the pool reads the pipe of a worker
        that got jobs."""
        pending = self._pending
        flush: set[_Worker] = set()
        while pending:
            best: _Worker | None = None
            best_load = 0
            for worker in self._workers:
                if worker.alive and worker.room(self._max_jobs) > 0:
                    load = len(worker.held)
                    if best is None or load < best_load:
                        best, best_load = worker, load
            if best is None:
                break
            job = pending.popleft()
            if job.abandoned:
                continue
            best.held[job.id] = job
            best.outbox.append(job)
            best.given += 1
            job.worker = best
            flush.add(best)
        for worker in flush:
            self._flush(worker)
            if worker.pool_reads or worker.reader is not None or not worker.held:
                continue
            if waiter is not None and waiter.worker is worker and len(worker.held) == 1:
                worker.reader = waiter
            else:
                worker.give_to_pool()

    def _settle(self, job: _Job, *, result: Any = None, error: BaseException | None = None) -> None:
        if job.settled:
            return
        job.settled = True
        job.result, job.error = result, error
        if job.done is not None:
            job.done.set()
        if job.reading is not None:  # its caller reads its worker's pipe: stop that
            job.reading.cancel()
        if not job.abandoned:
            self._release()

    def _release(self) -> None:
        self._live -= 1
        if not self._live and self._idle is not None:
            self._idle.set()

    def _abandon(self, job: _Job) -> None:
        """The caller stopped waiting: drop the job, or withdraw it from its worker."""
        if job.abandoned or job.settled:
            return
        job.abandoned = True
        self._release()
        worker = job.worker
        if worker is not None and worker.held.get(job.id) is job and job not in worker.outbox:
            worker.withdrawn.append(job.id)  # sent, or being sent
            self._flush(worker)

    async def _wait(self, job: _Job) -> Any:
        """The job's result (or its exception): read by this task when the job is all its worker
        holds, else handed over by the task that reads the worker's pipe. A job settled already
        costs no wait."""
        if not job.settled:
            try:
                worker = job.worker
                if worker is not None and worker.reader is job:
                    await self._read_answer(worker, job)
                if not job.settled:
                    job.done = anyio.Event()
                    await job.done.wait()
            except BaseException:
                self._abandon(job)
                raise
        if job.error is not None:
            error, job.error = job.error, None
            try:
                raise error
            finally:
                del error  # no cycle: this frame, the exception, its traceback
        return job.result

    async def run(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Run ``fn(*args, **kwargs)`` in a worker process and return its result.

        ``fn``, its arguments and its result travel by pickle (``fn`` must be importable by the
        workers under spawn and forkserver). They are pickled here: what cannot be pickled raises
        ``TypeError`` at this call. If ``fn`` raises, this raises the same exception, whose
        ``__cause__`` is an :class:`aioipc.RemoteTraceback` with the worker's traceback; an
        exception or result that cannot travel back becomes an :class:`aioipc.RemoteError`. If the
        worker dies while running the job, this raises :class:`aioipc.WorkerDied` (naming the
        worker, its pid and exit code or signal) and the pool starts a replacement; the other jobs
        go on. Raises :class:`aioipc.ClosedResourceError` once the pool is closing, or when it was
        closed by an error before the job finished.

        **Cancellation**: the caller stops waiting at once. A job no worker has started yet never
        runs; a job already running runs to its end in its worker and its result is dropped.
        """
        job = self._submit(fn, args, kwargs, waits=True)
        result: R = await self._wait(job)
        return result

    def map(
        self, fn: Callable[[T], R], iterable: Iterable[T], *, window: int | None = None
    ) -> PoolMap[R]:
        """Run ``fn(item)`` for each item of ``iterable`` in the workers; iterate over the results
        in the order of the items.

        At most ``window`` jobs (default: twice the jobs the workers can hold) are in the pool at
        a time, so a long iterable is read as the results are consumed. A job that raises ends the
        iteration with its exception (as :meth:`run` raises it); the jobs still in the pool are
        then withdrawn. Leaving the loop early (``break``) withdraws them too, once the iterator
        is closed (``aclose()``) or dropped.

        **Cancellation**: as :meth:`run`, for every job of the map still in the pool.
        """
        self._check_open()
        if window is None:
            window = 2 * self._processes * self._depth
        if window < 1:
            raise ValueError("window must be at least 1")
        return PoolMap(self, fn, iterable, window)


class PoolMap(Generic[R]):
    """The ordered results of :meth:`Pool.map`, as an async iterator."""

    def __init__(
        self, pool: Pool, fn: Callable[[Any], R], items: Iterable[Any], window: int
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._items = iter(items)
        self._window = window
        self._jobs: deque[_Job] = deque()
        self._exhausted = False
        self._closed = False

    def __aiter__(self) -> PoolMap[R]:
        return self

    def _fill(self) -> None:
        while not self._exhausted and len(self._jobs) < self._window:
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
                return
            self._jobs.append(self._pool._submit(self._fn, (item,), {}))

    async def __anext__(self) -> R:
        """The next result, in order.

        **Cancellation**: as :meth:`Pool.run`: the jobs of the map still in the pool are
        withdrawn and the map is closed.
        """
        if self._closed:
            raise StopAsyncIteration
        try:
            self._fill()
            if not self._jobs:
                self._closed = True
                raise StopAsyncIteration
            job = self._jobs.popleft()
            try:
                result: R = await self._pool._wait(job)
            except BaseException:
                self.close()
                raise
            self._fill()
            return result
        except StopAsyncIteration:
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Withdraw the jobs still in the pool; the iteration ends. Idempotent."""
        self._closed = True
        while self._jobs:
            self._pool._abandon(self._jobs.popleft())

    async def aclose(self) -> None:
        """Withdraw the jobs still in the pool, as :meth:`close`.

        **Cancellation**: none needed; it returns at once.
        """
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # the pool is gone (interpreter exit)
                pass


def open_pool(
    processes: int | None = None,
    *,
    ctx: Any = None,
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
    max_jobs_per_worker: int | None = None,
    prefetch: int = 2,
    stop_timeout: float = 5.0,
) -> Pool:
    """A pool of ``processes`` worker processes (default: the number of CPUs), for ``async with``.

    ``ctx`` is the multiprocessing context (start method) of the workers; ``initializer(*initargs)``
    runs in each worker before its first job (if it raises, the pool is broken: every job and
    every later call raises :class:`aioipc.BrokenResourceError` naming the error). A worker is
    replaced by a fresh one after ``max_jobs_per_worker`` jobs (None: never). ``prefetch`` is the
    number of jobs sent to a busy worker ahead of the one it runs, so that it never waits for the
    next one (0: a job goes to a worker only once it is free).

    When the block ends normally, the jobs still queued or running run to their end (their callers
    are waiting), then the workers exit; a worker still busy with a job whose caller left is
    terminated. When the block raises or is cancelled, the workers are terminated at once and the
    jobs not finished raise :class:`aioipc.ClosedResourceError`. Either way, a worker that does not
    exit within ``stop_timeout`` seconds is terminated, then killed; no process, thread or file
    descriptor is left behind.
    """
    return Pool(
        processes,
        ctx=ctx,
        initializer=initializer,
        initargs=initargs,
        max_jobs_per_worker=max_jobs_per_worker,
        prefetch=prefetch,
        stop_timeout=stop_timeout,
    )
