"""An async web server that hands CPU-bound jobs to long-lived worker processes.

A Starlette app served by uvicorn. ``GET /fib/{n}`` computes a Fibonacci number the slow way
(exponential time, so ``n`` = 30 takes a good fraction of a second): the handler puts the job on an
aioipc queue and awaits its own result while the event loop goes on serving other requests.

- A pool of worker processes starts with the app (the lifespan) and stops with it.
- Every job carries an id; one dispatcher task reads the results queue and resolves the future of
  the request that asked. Answers come back in the order the jobs finish: a slow job never holds
  back the answer to a fast one that another worker ran.
- A heartbeat task measures how late the event loop wakes it; ``GET /stats`` reports the worst
  delays.

    python examples/asgi_workers.py [--port 8000] [--processes 2] [--start-method spawn]
    curl http://127.0.0.1:8000/fib/25
    curl http://127.0.0.1:8000/stats

Stop it with Ctrl-C (or SIGTERM): uvicorn finishes the requests in flight, then the lifespan stops
the workers and closes the queues.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aioipc

#: The largest n accepted by /fib/{n} (fib(32) takes most of a second).
MAX_N = 32

Job = tuple[int, int]  # (job id, n)
Result = tuple[int, int | Exception]  # (job id, fib(n) or the error it raised)


def fib(n: int) -> int:
    """The CPU-bound job: deliberately naive, so that its cost grows quickly with n."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def worker(jobs: aioipc.Queue[Job], results: aioipc.Queue[Result]) -> None:
    """Runs in each worker process (synchronous code: it uses the queues' blocking faces)."""
    # Ctrl-C reaches the whole process group: the server handles it and stops the workers itself,
    # after the requests in flight have their answers. SIGTERM keeps its default action.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        while True:
            try:
                job_id, n = jobs.sync.get()
            except aioipc.ShutDown:
                break
            try:
                value: int | Exception = fib(n)
            except Exception as exc:
                value = exc
            results.sync.put((job_id, value))
    finally:
        jobs.close()
        results.close()


class WorkerPool:
    """Sends jobs to the worker processes and hands each result to the task that awaits it.

    Made by :func:`open_worker_pool`; ``await pool.run(n)`` from any task of the event loop.
    """

    def __init__(self, jobs: aioipc.Queue[Job]) -> None:
        self._jobs = jobs
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._ids = itertools.count()
        #: The worker processes' ids.
        self.pids: list[int | None] = []
        #: Results received so far.
        self.done = 0

    async def run(self, n: int) -> int:
        """Compute ``fib(n)`` in a worker process.

        Raises :class:`aioipc.ShutDown` once the pool is stopping.

        **Cancellation**: the caller stops waiting at once; the job, if already queued, still runs
        and its result is dropped.
        """
        job_id = next(self._ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = future
        try:
            await self._jobs.put((job_id, n))
            return await future
        finally:
            del self._pending[job_id]

    async def dispatch(self, results: aioipc.Queue[Result]) -> None:
        """Hand each result to the task that asked for it, in whatever order they come, until the
        results queue is shut down and drained.

        **Cancellation**: stops handing out results.
        """
        async for job_id, value in results:
            self.done += 1
            future = self._pending.get(job_id)
            if future is None or future.done():  # its request went away
                continue
            if isinstance(value, Exception):
                future.set_exception(value)
            else:
                future.set_result(value)


@asynccontextmanager
async def open_worker_pool(size: int, ctx: BaseContext) -> AsyncIterator[WorkerPool]:
    """Start ``size`` worker processes for the duration of the block.

    When the block ends, the workers finish the jobs still queued and exit; the results of those
    jobs are handed out; then the queues are closed. If the block raises, the workers are
    terminated instead.
    """
    async with aioipc.Queue[Job](ctx=ctx) as jobs, aioipc.Queue[Result](ctx=ctx) as results:
        pool = WorkerPool(jobs)
        dispatcher = asyncio.create_task(pool.dispatch(results), name="result dispatcher")
        try:
            async with AsyncExitStack() as workers:  # on exit, it awaits every worker's exit
                for i in range(1, size + 1):
                    process = await workers.enter_async_context(
                        aioipc.open_process(worker, jobs, results, ctx=ctx, name=f"fib-worker-{i}")
                    )
                    pool.pids.append(process.pid)
                try:
                    yield pool
                finally:
                    jobs.shutdown()  # each worker finishes the queued jobs, then exits
            # Every worker has exited, so every result is in: the dispatcher hands out the last
            # ones, then its loop ends.
            results.shutdown()
            await dispatcher
        finally:
            dispatcher.cancel()  # still running only after an error


@dataclass
class Heartbeat:
    """Wakes up every ``interval`` seconds and records how late the event loop let it run.

    ``max_lag`` is the worst delay seen. ``max_stall`` is the same delay less the time the loop's
    thread spent waiting for a CPU (Linux counts it per thread; elsewhere nothing is subtracted):
    on a busy machine the operating system can hold a ready thread back for tens of milliseconds,
    which says nothing about the code running on the loop.
    """

    interval: float = 0.005
    max_lag: float = 0.0
    max_stall: float = 0.0

    async def run(self) -> None:
        """Beat until cancelled.

        **Cancellation**: the way to stop it.
        """
        loop = asyncio.get_running_loop()
        try:
            schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            schedstat = -1
        try:
            while True:
                start, queued = loop.time(), _cpu_wait(schedstat)
                await asyncio.sleep(self.interval)
                lag = loop.time() - start - self.interval
                self.max_lag = max(self.max_lag, lag)
                self.max_stall = max(self.max_stall, lag - (_cpu_wait(schedstat) - queued))
        finally:
            if schedstat >= 0:
                os.close(schedstat)


def _cpu_wait(schedstat: int) -> float:
    """Seconds this thread has spent ready to run but waiting for a CPU (0.0 if unknown)."""
    if schedstat < 0:
        return 0.0
    # Three numbers: time on a CPU, time waiting for one (both in ns), time slices.
    return int(os.pread(schedstat, 128, 0).split()[1]) / 1e9


def create_app(processes: int, ctx: BaseContext) -> Starlette:
    """The ASGI app; its lifespan owns the worker pool and the heartbeat."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        heartbeat = Heartbeat()
        async with open_worker_pool(processes, ctx) as pool:
            beating = asyncio.create_task(heartbeat.run(), name="heartbeat")
            try:
                yield {"pool": pool, "heartbeat": heartbeat}
            finally:
                beating.cancel()
        print(f"stopped {processes} worker processes after {pool.done} jobs", flush=True)

    async def fib_endpoint(request: Request) -> JSONResponse:
        pool: WorkerPool = request.state.pool
        try:
            n = int(request.path_params["n"])
        except ValueError:
            return JSONResponse({"error": "n must be an integer"}, status_code=400)
        if not 0 <= n <= MAX_N:
            return JSONResponse({"error": f"n must be between 0 and {MAX_N}"}, status_code=400)
        try:
            value = await pool.run(n)
        except aioipc.ShutDown:
            return JSONResponse({"error": "the server is shutting down"}, status_code=503)
        return JSONResponse({"n": n, "fib": value})

    async def stats_endpoint(request: Request) -> JSONResponse:
        pool: WorkerPool = request.state.pool
        heartbeat: Heartbeat = request.state.heartbeat
        return JSONResponse(
            {
                "max_loop_lag_ms": round(heartbeat.max_lag * 1000, 3),
                "max_loop_stall_ms": round(heartbeat.max_stall * 1000, 3),
                "jobs_done": pool.done,
                "worker_pids": pool.pids,
            }
        )

    routes = [Route("/fib/{n}", fib_endpoint), Route("/stats", stats_endpoint)]
    return Starlette(routes=routes, lifespan=lifespan)


def exit_normally(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler outside uvicorn: exit normally, so that the interpreter's clean-up runs
    (uvicorn shuts down gracefully on SIGTERM, then raises it again for the previous handler)."""
    raise SystemExit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods())
    args = parser.parse_args()
    app = create_app(args.processes, multiprocessing.get_context(args.start_method))
    signal.signal(signal.SIGTERM, exit_normally)
    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False)


if __name__ == "__main__":
    main()
