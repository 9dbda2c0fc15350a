"""The example programs: each one runs as a user would run it, and prints what it promises.

Every example runs in a fresh interpreter with warnings turned into errors (so an unclosed queue
or a leaked semaphore shows up on stderr), and must leave stderr empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import START_METHODS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: The examples print whole lines with ``flush=True`` from several processes; with unbuffered
#: output (``python -u``) a line and its newline are two writes, and lines may interleave.
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}


def run_example(name: str, *args: str, timeout: float = 60) -> list[str]:
    """Run ``examples/<name>``; check it succeeded quietly; return its stdout lines."""
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )
    assert done.stderr == "", done.stderr
    assert done.returncode == 0
    return done.stdout.splitlines()


def matches(pattern: str, lines: list[str]) -> list[tuple[str, ...]]:
    """The groups of every line that matches ``pattern`` entirely, in order."""
    return [m.groups() for line in lines if (m := re.fullmatch(pattern, line))]


# -- queue_producer_consumer.py --------------------------------------------------------------------


@pytest.mark.parametrize("start_method", START_METHODS)
def test_queue_producer_consumer_pops_every_item_in_order(start_method: str) -> None:
    lines = run_example("queue_producer_consumer.py", "--start-method", start_method)

    appended = matches(r"Process Producer : item (\d+) appended to queue Producer", lines)
    popped = matches(r"Process Consumer : item (\d+) popped from by Consumer", lines)
    sizes = matches(r"The size of queue is (\d+)", lines)
    assert len(appended) == 10
    assert all(0 <= int(item) <= 256 for (item,) in appended)
    assert popped == appended
    assert len(sizes) == 10
    assert lines[-1] == "The consumer popped 10 items; the producer exited with code 0"
    assert len(lines) == 31


# -- pipe_pipeline.py ------------------------------------------------------------------------------


@pytest.mark.parametrize("start_method", START_METHODS)
def test_pipe_pipeline_prints_every_square_then_end_at_eof(start_method: str) -> None:
    lines = run_example("pipe_pipeline.py", "--start-method", start_method)

    assert lines == [str(n * n) for n in range(10)] + ["End"]


# -- joinable_queue.py -----------------------------------------------------------------------------


def sha_chain(task: int) -> str:
    digest = hashlib.sha256(str(task).encode())
    for _ in range(20_000):
        digest = hashlib.sha256(digest.digest())
    return digest.hexdigest()[:12]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_joinable_queue_join_returns_after_every_task_of_its_round_is_done(
    start_method: str,
) -> None:
    lines = run_example("joinable_queue.py", "--start-method", start_method)

    done_at = {
        int(task): (i, digest)
        for i, line in enumerate(lines)
        if (m := re.fullmatch(r"worker-[123] did task (\d+): ([0-9a-f]{12})", line))
        for task, digest in [m.groups()]
    }
    assert sorted(done_at) == list(range(16))
    assert all(digest == sha_chain(task) for task, (_, digest) in done_at.items())
    round_1_joined = lines.index("round 1: all tasks done")
    round_2_joined = lines.index("round 2: all tasks done")
    assert all(done_at[task][0] < round_1_joined for task in range(8))
    assert all(round_1_joined < done_at[task][0] < round_2_joined for task in range(8, 16))
    assert lines[-1] == "3 workers stopped"
    assert len(lines) == 16 + 4 + 1


# -- trio_fanout.py --------------------------------------------------------------------------------


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


@pytest.mark.parametrize("start_method", START_METHODS)
def test_trio_fanout_consumers_share_every_result(start_method: str) -> None:
    lines = run_example("trio_fanout.py", "--start-method", start_method)

    results = matches(r"(consumer-[abc]) got (\d+) -> 1 in (\d+) steps from worker-[123]", lines)
    assert sorted(int(n) for _, n, _ in results) == list(range(1, 31))
    assert all(int(steps) == collatz_steps(int(n)) for _, n, steps in results)
    (shares,) = matches(
        r"consumed 30 results \(consumer-a (\d+), consumer-b (\d+), consumer-c (\d+)\)", lines
    )
    assert [int(share) for share in shares] == [
        sum(1 for consumer, _, _ in results if consumer == name)
        for name in ("consumer-a", "consumer-b", "consumer-c")
    ]
    assert len(lines) == 31


# -- asgi_workers.py -------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the test client; the server is uvicorn's own process


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of the process group that have not exited (zombies excluded)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no /proc: ask the system whether the group has any member left
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    pids = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


class Server:
    """``examples/asgi_workers.py`` running in its own process group."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "error",
                str(EXAMPLES / "asgi_workers.py"),
                "--port",
                str(self.port),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    async def wait_until_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.process.communicate()
            try:
                await client.get("/stats")
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start within 30 s"
                await asyncio.sleep(0.1)
            else:
                return

    def stop(self, sig: signal.Signals) -> str:
        """Send ``sig``; check the server exits cleanly, leaving no process behind; return its
        stdout."""
        self.process.send_signal(sig)
        stdout, stderr = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, stderr
        unexpected = [line for line in stderr.splitlines() if not line.startswith("INFO: ")]
        assert unexpected == []
        deadline = time.monotonic() + 5
        while left := live_processes_in_group(self.process.pid):
            assert time.monotonic() < deadline, f"processes left running: {left}"
            time.sleep(0.05)
        return stdout

    def kill(self) -> None:
        if self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()


@contextmanager
def asgi_server(*args: str) -> Iterator[Server]:
    server = Server(*args)
    try:
        yield server
    finally:
        server.kill()  # only if a check failed before it stopped


@asynccontextmanager
async def client_of(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        await server.wait_until_ready(client)
        yield client


@pytest.mark.anyio
@pytest.mark.blocks_on_the_loop  # the server is a subprocess, started and stopped blocking
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [(), ("--start-method", "spawn")], ids=["default", "spawn"])
async def test_asgi_workers_answers_500_concurrent_requests_without_stalling_its_loop(
    args: tuple[str, ...],
) -> None:
    with asgi_server(*args) as server:
        async with client_of(server) as client:
            ns = [i % 20 for i in range(500)]
            responses = await asyncio.gather(*(client.get(f"/fib/{n}") for n in ns))
            stats = (await client.get("/stats")).json()
        server.stop(signal.SIGINT)

    assert [response.json() for response in responses] == [{"n": n, "fib": fib(n)} for n in ns]
    assert stats["jobs_done"] == 500
    assert stats["max_loop_stall_ms"] < 50, stats


@pytest.mark.anyio
@pytest.mark.blocks_on_the_loop  # the server is a subprocess, started and stopped blocking
@pytest.mark.timeout(120)
async def test_asgi_workers_answers_a_fast_job_while_a_slow_one_runs() -> None:
    with asgi_server() as server:
        async with client_of(server) as client:
            slow = asyncio.ensure_future(client.get("/fib/32"))
            fast = await client.get("/fib/3")
            slow_was_running = not slow.done()
            slow_response = await slow
        server.stop(signal.SIGINT)

    assert fast.json() == {"n": 3, "fib": 2}
    assert slow_was_running
    assert slow_response.json() == {"n": 32, "fib": fib(32)}


@pytest.mark.anyio
@pytest.mark.blocks_on_the_loop  # the server is a subprocess, started and stopped blocking
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_asgi_workers_stops_its_workers_and_exits_cleanly_on(sig: signal.Signals) -> None:
    with asgi_server("--processes", "3") as server:
        async with client_of(server) as client:
            response = await client.get("/fib/10")
            pids = (await client.get("/stats")).json()["worker_pids"]
        stdout = server.stop(sig)

    assert response.json() == {"n": 10, "fib": 55}
    assert len(pids) == 3
    assert stdout.splitlines() == ["stopped 3 worker processes after 1 jobs"]


@pytest.mark.anyio
@pytest.mark.blocks_on_the_loop  # the server is a subprocess, started and stopped blocking
@pytest.mark.timeout(120)
async def test_asgi_workers_answers_a_crash_with_502_at_once_and_goes_on() -> None:
    with asgi_server("--processes", "2") as server:
        async with client_of(server) as client:
            slow = asyncio.ensure_future(client.get("/fib/27"))
            before = (await client.get("/stats")).json()["worker_pids"]
            crashed = await client.get("/crash")
            after_crash = await asyncio.gather(*(client.get(f"/fib/{n}") for n in range(20)))
            slow_response = await slow
            stats = (await client.get("/stats")).json()
        # A worker is dead and replaced; SIGTERM still ends the server at once and cleanly.
        server.stop(signal.SIGTERM)

    assert crashed.status_code == 502
    body = crashed.json()
    assert body["pid"] in before
    assert body["exitcode"] == -signal.SIGKILL
    assert "SIGKILL" in body["error"]
    assert [r.json() for r in after_crash] == [{"n": n, "fib": fib(n)} for n in range(20)]
    assert slow_response.json() == {"n": 27, "fib": fib(27)}
    assert stats["workers_lost"] == 1
    assert len(stats["worker_pids"]) == 2
    assert body["pid"] not in stats["worker_pids"]
