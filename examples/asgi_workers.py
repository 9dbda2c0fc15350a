"""An async web server that hands CPU-bound jobs to a pool of long-lived worker processes.

A Starlette app served by uvicorn. ``GET /fib/{n}`` computes a Fibonacci number the slow way
(exponential time, so ``n`` = 30 takes a good fraction of a second): the handler awaits
``pool.run(fib, n)`` while the event loop goes on serving other requests.

- The pool (``aioipc.open_pool``) starts with the app (the lifespan) and stops with it: at the end
  the workers finish the jobs in flight, then exit.
- ``GET /crash`` runs a job that kills its own worker (as a segfault or the OOM killer would): that
  request gets a 502 answer at once, naming the worker and the signal; the pool starts a
  replacement and the other requests go on.
- A heartbeat task measures how late the event loop wakes it; ``GET /stats`` reports the worst
  delays.

    python examples/asgi_workers.py [--port 8000] [--processes 2] [--start-method spawn]
    curl http://127.0.0.1:8000/fib/25
    curl http://127.0.0.1:8000/crash
    curl http://127.0.0.1:8000/stats

Stop it with Ctrl-C (or SIGTERM): uvicorn finishes the requests in flight, then the lifespan stops
the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


def fib(n: int) -> int:
    """The CPU-bound job: deliberately naive, so that its cost grows quickly with n."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def crash() -> None:
    """A job that kills the worker running it."""
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Counters:
    jobs_done: int = 0
    workers_lost: int = 0


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
        counters = Counters()
        async with aioipc.open_pool(processes, ctx=ctx) as pool:
            beating = asyncio.create_task(heartbeat.run(), name="heartbeat")
            try:
                yield {"pool": pool, "heartbeat": heartbeat, "counters": counters}
            finally:
                beating.cancel()
        print(f"stopped {processes} worker processes after {counters.jobs_done} jobs", flush=True)

    async def fib_endpoint(request: Request) -> JSONResponse:
        pool: aioipc.Pool = request.state.pool
        counters: Counters = request.state.counters
        try:
            n = int(request.path_params["n"])
        except ValueError:
            return JSONResponse({"error": "n must be an integer"}, status_code=400)
        if not 0 <= n <= MAX_N:
            return JSONResponse({"error": f"n must be between 0 and {MAX_N}"}, status_code=400)
        try:
            value = await pool.run(fib, n)
        except aioipc.WorkerDied as exc:
            counters.workers_lost += 1
            return JSONResponse({"error": str(exc)}, status_code=502)
        except aioipc.ClosedResourceError:
            return JSONResponse({"error": "the server is shutting down"}, status_code=503)
        counters.jobs_done += 1
        return JSONResponse({"n": n, "fib": value})

    async def crash_endpoint(request: Request) -> JSONResponse:
        pool: aioipc.Pool = request.state.pool
        counters: Counters = request.state.counters
        try:
            await pool.run(crash)
        except aioipc.WorkerDied as exc:  # the one exception a dead worker's caller sees
            counters.workers_lost += 1
            return JSONResponse(
                {"error": str(exc), "pid": exc.pid, "exitcode": exc.exitcode}, status_code=502
            )
        return JSONResponse({"error": "the worker survived"}, status_code=500)

    async def stats_endpoint(request: Request) -> JSONResponse:
        pool: aioipc.Pool = request.state.pool
        heartbeat: Heartbeat = request.state.heartbeat
        counters: Counters = request.state.counters
        return JSONResponse(
            {
                "max_loop_lag_ms": round(heartbeat.max_lag * 1000, 3),
                "max_loop_stall_ms": round(heartbeat.max_stall * 1000, 3),
                "jobs_done": counters.jobs_done,
                "workers_lost": counters.workers_lost,
                "worker_pids": pool.pids,
            }
        )

    routes = [
        Route("/fib/{n}", fib_endpoint),
        Route("/crash", crash_endpoint),
        Route("/stats", stats_endpoint),
    ]
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
