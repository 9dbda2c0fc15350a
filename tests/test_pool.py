"""aioipc.open_pool: jobs in long-lived worker processes, and one face for each way they fail.

The fault tests run on asyncio, uvloop and trio. They synchronise with the workers through a
report queue and a release event handed to every worker by the pool's initializer: a job says
where it runs, then waits to be released, so a test knows which worker is busy with which job.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import time
from typing import Any

import anyio
import pytest
from _helpers import fds_back_to, open_fds

import aioipc

pytestmark = pytest.mark.anyio

FORK = multiprocessing.get_context("fork")

# -- what the workers run (module level, so that spawn and forkserver children import them) --

_report: aioipc.Queue[Any] | None = None
_release: Any = None


def remember(report: aioipc.Queue[Any], release: Any) -> None:
    # release: the shared flag of a Flag
    global _report, _release
    _report, _release = report, release


def square(x: int) -> int:
    return x * x


def check_not_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def pid_of_worker() -> int:
    return os.getpid()


def raise_value_error(text: str) -> None:
    raise ValueError(text)


def exit_now(code: int) -> None:
    os._exit(code)


def call_sys_exit(code: int) -> None:
    sys.exit(code)


def block(tag: str) -> str:
    """Say where it runs, then wait for the test's release."""
    assert _report is not None
    _report.sync.put((tag, os.getpid()))
    while not _release.value:  # a shared flag: an Event's set() hangs once a waiter was killed
        time.sleep(0.002)
    return tag


def record(tag: str) -> str:
    assert _report is not None
    _report.sync.put((tag, os.getpid()))
    return tag


def hang() -> None:
    assert _report is not None
    _report.sync.put(("hang", os.getpid()))
    signal.pause()


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("no pickling for this one")


class NeedsTwoArguments(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}-{b}")


def raise_unpicklable() -> None:
    raise Unpicklable("local state")


def raise_needs_two() -> None:
    raise NeedsTwoArguments("x", "y")


def return_a_lock() -> Any:
    import threading

    return threading.Lock()


def fail_to_initialize() -> None:
    raise RuntimeError("no database")


def fail_after_two_workers(report: aioipc.Queue[Any], release: Any, started: Any) -> None:
    """The first two workers start; the initializer of any later one raises."""
    with started.get_lock():
        started.value += 1
        if started.value > 2:
            raise RuntimeError("no database")
    remember(report, release)


# -- helpers --


class Flag:
    """A flag shared with the workers; unlike an Event, killing a process waiting for it is fine."""

    def __init__(self, ctx: Any) -> None:
        self.value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self.value.value = 1


class Probe:
    """The report queue and release event shared with the workers."""

    def __init__(self, ctx: Any) -> None:
        self.report: aioipc.Queue[Any] = aioipc.Queue(ctx=ctx)
        self.release = Flag(ctx)

    def pool(self, processes: int, ctx: Any, **kwargs: Any) -> aioipc.Pool:
        return aioipc.open_pool(
            processes,
            ctx=ctx,
            initializer=remember,
            initargs=(self.report, self.release.value),
            **kwargs,
        )

    async def started(self) -> tuple[str, int]:
        with anyio.fail_after(20):
            tag, pid = await self.report.get()
        return str(tag), int(pid)

    def close(self) -> None:
        self.report.close()


@pytest.fixture
def probe() -> Any:
    p = Probe(FORK)
    yield p
    p.close()


async def outcome(pool: aioipc.Pool, fn: Any, *args: Any) -> Any:
    """The result of the job, or the exception it raised."""
    try:
        return await pool.run(fn, *args)
    except Exception as exc:
        return exc


async def run_in_scope(scope: anyio.CancelScope, awaitable: Any) -> None:
    with scope:
        await awaitable


# -- running jobs --


async def test_run_returns_the_result_under_each_start_method(ctx: Any) -> None:
    async with aioipc.open_pool(1, ctx=ctx) as pool:
        assert await pool.run(square, 7) == 49
        assert await pool.run(pid_of_worker) != os.getpid()


async def test_run_passes_keyword_arguments() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        assert await pool.run(divmod, 17, 5) == (3, 2)
        assert await pool.run(int, "ff", base=16) == 255


async def test_map_yields_the_results_in_order() -> None:
    async with aioipc.open_pool(2, ctx=FORK) as pool:
        assert [y async for y in pool.map(square, range(50))] == [x * x for x in range(50)]


async def test_map_reads_the_iterable_as_results_are_consumed() -> None:
    taken: list[int] = []

    def items() -> Any:
        for i in range(100):
            taken.append(i)
            yield i

    async with aioipc.open_pool(1, ctx=FORK) as pool:
        results = pool.map(square, items(), window=3)
        assert await results.__anext__() == 0
        assert len(taken) <= 4
        await results.aclose()


async def test_map_raises_the_exception_of_a_failed_item_in_its_place() -> None:
    async with aioipc.open_pool(2, ctx=FORK) as pool:
        seen: list[int] = []

        async def consume() -> None:
            async for y in pool.map(check_not_three, range(10)):
                seen.append(y)

        with pytest.raises(ValueError, match="three"):
            await consume()
        assert seen == [0, 1, 2]
        assert await pool.run(square, 2) == 4


async def test_large_arguments_and_results_travel_whole() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB: beyond what is written on the spot
    async with aioipc.open_pool(2, ctx=FORK) as pool:
        assert await pool.run(len, big) == len(big)
        assert await pool.run(bytes, len(big)) == bytes(len(big))
        results = [y async for y in pool.map(len, [big] * 8)]
        assert results == [len(big)] * 8


async def test_many_concurrent_jobs_all_get_their_own_result() -> None:
    results: dict[int, int] = {}

    async def one(pool: aioipc.Pool, i: int) -> None:
        results[i] = await pool.run(square, i)

    async with aioipc.open_pool(2, ctx=FORK) as pool, anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, pool, i)
    assert results == {i: i * i for i in range(300)}


async def test_unpicklable_arguments_raise_type_error_at_the_call() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        with pytest.raises(TypeError, match="cannot send the job"):
            await pool.run(square, lambda: 1)
        assert await pool.run(square, 2) == 4


# -- a job that raises --


async def test_a_job_that_raises_raises_its_own_exception_with_the_worker_traceback() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        with pytest.raises(ValueError, match="bad input") as info:
            await pool.run(raise_value_error, "bad input")
        cause = info.value.__cause__
        assert isinstance(cause, aioipc.RemoteTraceback)
        assert "raise_value_error" in cause.text
        assert await pool.run(square, 3) == 9  # the worker goes on


async def test_an_exception_that_cannot_be_pickled_becomes_a_remote_error() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        with pytest.raises(aioipc.RemoteError, match="Unpicklable: local state") as info:
            await pool.run(raise_unpicklable)
        assert isinstance(info.value.__cause__, aioipc.RemoteTraceback)


async def test_an_exception_that_cannot_be_unpickled_becomes_a_remote_error() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        with pytest.raises(aioipc.RemoteError, match="NeedsTwoArguments: x-y"):
            await pool.run(raise_needs_two)


async def test_a_result_that_cannot_be_pickled_becomes_a_remote_error() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        with pytest.raises(aioipc.RemoteError, match="result of type lock"):
            await pool.run(return_a_lock)
        assert await pool.run(square, 3) == 9


async def test_an_initializer_that_raises_breaks_the_pool() -> None:
    async with aioipc.open_pool(1, ctx=FORK, initializer=fail_to_initialize) as pool:
        with pytest.raises(aioipc.BrokenResourceError, match="no database"):
            await pool.run(square, 2)
        with pytest.raises(aioipc.BrokenResourceError, match="initializer raised"):
            await pool.run(square, 2)


# -- a worker that dies --


async def test_a_busy_worker_killed_fails_only_its_job_and_is_replaced(probe: Probe) -> None:
    async with probe.pool(2, FORK) as pool, anyio.create_task_group() as tg:
        outcomes: dict[str, Any] = {}

        async def job(tag: str) -> None:
            outcomes[tag] = await outcome(pool, block, tag)

        tg.start_soon(job, "a")
        tg.start_soon(job, "b")
        running = dict([await probe.started(), await probe.started()])
        os.kill(running["a"], signal.SIGKILL)
        with anyio.fail_after(10):
            while "a" not in outcomes:
                await anyio.sleep(0.01)
        died = outcomes["a"]
        assert isinstance(died, aioipc.WorkerDied)
        assert died.pid == running["a"]
        assert died.exitcode == -signal.SIGKILL
        assert "SIGKILL" in str(died)
        assert str(running["a"]) in str(died)
        assert "b" not in outcomes  # the other worker's job goes on
        probe.release.set()
    assert outcomes["b"] == "b"


async def test_a_killed_worker_fails_its_job_and_is_replaced_under_each_start_method(
    ctx: Any,
) -> None:
    probe = Probe(ctx)
    try:
        async with probe.pool(1, ctx) as pool, anyio.create_task_group() as tg:
            outcomes: list[Any] = []

            async def job() -> None:
                outcomes.append(await outcome(pool, block, "victim"))

            tg.start_soon(job)
            _, pid = await probe.started()
            os.kill(pid, signal.SIGKILL)
            assert await pool.run(pid_of_worker) != pid  # served by the replacement
        assert isinstance(outcomes[0], aioipc.WorkerDied)
        assert outcomes[0].pid == pid
    finally:
        probe.close()


async def test_a_replacement_serves_the_next_jobs(probe: Probe) -> None:
    async with probe.pool(1, FORK) as pool:
        first = await pool.run(pid_of_worker)
        os.kill(first, signal.SIGKILL)
        second = await pool.run(pid_of_worker)
        assert second != first
        assert await pool.run(square, 5) == 25


async def test_an_idle_worker_killed_fails_nothing_and_is_replaced(probe: Probe) -> None:
    async with probe.pool(1, FORK) as pool:
        first = await pool.run(pid_of_worker)
        os.kill(first, signal.SIGKILL)
        results = [await pool.run(square, i) for i in range(5)]
        assert results == [0, 1, 4, 9, 16]
        assert await pool.run(pid_of_worker) != first


async def test_a_job_that_exits_the_worker_fails_with_worker_died() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        with pytest.raises(aioipc.WorkerDied, match="exited with code 3") as info:
            await pool.run(exit_now, 3)
        assert info.value.exitcode == 3
        assert info.value.name.startswith("aioipc-pool-worker-")
        assert await pool.run(square, 4) == 16


async def test_a_job_that_calls_sys_exit_fails_with_worker_died() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        with pytest.raises(aioipc.WorkerDied, match="exited with code 7"):
            await pool.run(call_sys_exit, 7)
        assert await pool.run(square, 4) == 16


async def test_jobs_queued_behind_a_dying_job_run_on_the_replacement(probe: Probe) -> None:
    async with probe.pool(1, FORK, prefetch=4) as pool:
        results: dict[str, Any] = {}

        async def job(tag: str, fn: Any, *args: Any) -> None:
            results[tag] = await outcome(pool, fn, *args)

        async with anyio.create_task_group() as tg:
            tg.start_soon(job, "blocker", block, "blocker")
            _, pid = await probe.started()  # the worker is busy; the next jobs wait behind it
            tg.start_soon(job, "exit", exit_now, 5)
            for i in range(3):
                tg.start_soon(job, f"after{i}", record, f"after{i}")
            await anyio.wait_all_tasks_blocked()  # they were sent to the busy worker
            probe.release.set()
        assert results["blocker"] == "blocker"
        assert isinstance(results["exit"], aioipc.WorkerDied)
        assert results["exit"].pid == pid
        assert [results[f"after{i}"] for i in range(3)] == ["after0", "after1", "after2"]
        ran = {(await probe.report.get())[0] for _ in range(3)}
        assert ran == {"after0", "after1", "after2"}  # each ran once, on the replacement


async def test_a_hanging_job_gives_way_to_the_callers_timeout(probe: Probe) -> None:
    async with probe.pool(1, FORK) as pool:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.5):
                await pool.run(hang)
        # The worker still runs the abandoned job; the block's end terminates it.
    assert multiprocessing.active_children() == []


# -- the caller of a worker's only job reads its answer itself --


@pytest.mark.parametrize("prefetch", [0, 2])
async def test_a_job_submitted_while_the_first_caller_reads_its_answer_gets_its_own(
    probe: Probe, prefetch: int
) -> None:
    async with probe.pool(1, FORK, prefetch=prefetch) as pool:
        results: dict[str, Any] = {}

        async def job(tag: str, fn: Any) -> None:
            results[tag] = await outcome(pool, fn, tag)

        async with anyio.create_task_group() as tg:
            tg.start_soon(job, "first", block)  # all the worker holds: its caller reads
            assert (await probe.started())[0] == "first"
            tg.start_soon(job, "second", record)  # behind it, in the worker or in the queue
            await anyio.wait_all_tasks_blocked()
            probe.release.set()
        assert results == {"first": "first", "second": "second"}
        assert await pool.run(square, 6) == 36


async def test_the_only_job_cancelled_while_its_caller_reads_has_its_result_dropped(
    probe: Probe,
) -> None:
    async with probe.pool(1, FORK) as pool:
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(run_in_scope, scope, pool.run(block, "cancelled"))
            assert (await probe.started())[0] == "cancelled"
            scope.cancel()
        assert scope.cancelled_caught
        probe.release.set()  # it runs to its end; its answer is for nobody
        assert await pool.run(record, "next") == "next"
        assert await pool.run(square, 7) == 49
        assert (await probe.started())[0] == "next"


async def test_a_job_submitted_after_the_reader_was_cancelled_gets_its_own_result(
    probe: Probe,
) -> None:
    async with probe.pool(1, FORK) as pool:
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(run_in_scope, scope, pool.run(block, "cancelled"))
            assert (await probe.started())[0] == "cancelled"
            scope.cancel()
            results: list[str] = []

            async def next_job() -> None:
                results.append(await pool.run(record, "next"))

            tg.start_soon(next_job)  # the worker still runs the cancelled job
            await anyio.wait_all_tasks_blocked()
            probe.release.set()
        assert results == ["next"]


async def test_a_worker_killed_while_its_only_caller_reads_fails_that_job_alone(
    probe: Probe,
) -> None:
    async with probe.pool(1, FORK) as pool:
        outcomes: dict[str, Any] = {}

        async def job(tag: str, fn: Any) -> None:
            outcomes[tag] = await outcome(pool, fn, tag)

        async with anyio.create_task_group() as tg:
            tg.start_soon(job, "victim", block)
            _, pid = await probe.started()
            tg.start_soon(job, "behind", record)  # sent to the same worker, not started
            await anyio.wait_all_tasks_blocked()
            os.kill(pid, signal.SIGKILL)
        died = outcomes["victim"]
        assert isinstance(died, aioipc.WorkerDied)
        assert (died.pid, died.exitcode) == (pid, -signal.SIGKILL)
        assert outcomes["behind"] == "behind"  # run by the replacement
        assert await pool.run(pid_of_worker) not in (pid, None)


async def test_a_caller_reading_its_answer_learns_at_once_that_another_worker_broke_the_pool(
    probe: Probe,
) -> None:
    workers_started = FORK.Value("i", 0)
    pool = aioipc.open_pool(
        2,
        ctx=FORK,
        initializer=fail_after_two_workers,
        initargs=(probe.report, probe.release.value, workers_started),
        max_jobs_per_worker=1,
    )
    async with pool, anyio.create_task_group() as tg:
        outcomes: list[Any] = []

        async def reader() -> None:
            outcomes.append(await outcome(pool, block, "held up"))

        tg.start_soon(reader)  # all its worker holds: its caller reads the answer
        assert (await probe.started())[0] == "held up"
        # The other worker runs this one job, exits, and its replacement's initializer raises.
        assert await pool.run(square, 2) == 4
        with anyio.fail_after(20):  # "held up" is not released: only the break ends its wait
            while not outcomes:
                await anyio.sleep(0.01)
        assert isinstance(outcomes[0], aioipc.BrokenResourceError)
        assert "no database" in str(outcomes[0])
        probe.release.set()


# -- cancellation --


async def test_a_cancelled_job_that_had_not_started_never_runs(probe: Probe) -> None:
    async with probe.pool(1, FORK, prefetch=2) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, block, "first")
            assert (await probe.started())[0] == "first"
            scope = anyio.CancelScope()
            tg.start_soon(run_in_scope, scope, pool.run(record, "cancelled"))
            await anyio.wait_all_tasks_blocked()  # sent to the busy worker
            scope.cancel()
            await anyio.wait_all_tasks_blocked()  # withdrawn before it starts
            probe.release.set()
        assert await pool.run(record, "last") == "last"
        assert (await probe.started())[0] == "last"
    assert probe.report.empty()


async def test_a_cancelled_job_still_queued_in_the_pool_never_runs(probe: Probe) -> None:
    async with probe.pool(1, FORK, prefetch=0) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, block, "first")
            assert (await probe.started())[0] == "first"
            scope = anyio.CancelScope()
            tg.start_soon(run_in_scope, scope, pool.run(record, "cancelled"))
            await anyio.wait_all_tasks_blocked()  # waiting in the pool's queue
            scope.cancel()
            probe.release.set()
        assert await pool.run(record, "last") == "last"
        assert (await probe.started())[0] == "last"
    assert probe.report.empty()


async def test_breaking_out_of_map_withdraws_the_remaining_jobs(probe: Probe) -> None:
    async with probe.pool(1, FORK) as pool:
        results = pool.map(record, [f"item{i}" for i in range(20)], window=4)
        async for first in results:
            assert first == "item0"
            break
        await results.aclose()
        assert await pool.run(square, 2) == 4
    ran = []
    while not probe.report.empty():
        ran.append((await probe.report.get())[0])
    assert len(ran) <= 5  # the window, not the whole iterable


# -- closing --


async def test_the_block_end_finishes_the_jobs_of_other_tasks(probe: Probe) -> None:
    results: list[str] = []

    async def caller(pool: aioipc.Pool) -> None:
        results.append(await pool.run(block, "late"))

    async with anyio.create_task_group() as tg, probe.pool(1, FORK) as pool:
        tg.start_soon(caller, pool)
        await probe.started()
        probe.release.set()  # the block ends while the job is still running
    assert results == ["late"]


async def test_an_error_in_the_block_terminates_the_workers_and_fails_their_jobs(
    probe: Probe,
) -> None:
    outcomes: list[Any] = []

    async def caller(pool: aioipc.Pool) -> None:
        outcomes.append(await outcome(pool, block, "stuck"))

    async def fail_in_the_block(tg: Any) -> None:
        async with probe.pool(1, FORK) as pool:
            tg.start_soon(caller, pool)
            await probe.started()
            raise KeyError("boom")

    async with anyio.create_task_group() as tg:
        with pytest.raises(KeyError):
            await fail_in_the_block(tg)
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], aioipc.ClosedResourceError)


async def test_a_closed_pool_refuses_jobs() -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        pass
    with pytest.raises(aioipc.ClosedResourceError):
        await pool.run(square, 1)


async def test_nothing_is_left_behind(probe: Probe) -> None:
    async with aioipc.open_pool(1, ctx=FORK) as pool:
        await pool.run(square, 1)
    before = open_fds()
    async with probe.pool(2, FORK) as pool:
        assert await pool.run(square, 3) == 9
        os.kill(await pool.run(pid_of_worker), signal.SIGKILL)
        assert [y async for y in pool.map(square, range(10))][-1] == 81
    assert await fds_back_to(before) == before


async def test_workers_are_recycled_after_max_jobs() -> None:
    async with aioipc.open_pool(1, ctx=FORK, max_jobs_per_worker=2) as pool:
        pids = [await pool.run(pid_of_worker) for _ in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="processes"):
        aioipc.open_pool(0)
    with pytest.raises(ValueError, match="max_jobs_per_worker"):
        aioipc.open_pool(1, max_jobs_per_worker=0)


def test_the_pool_exceptions_survive_pickling() -> None:
    died = aioipc.WorkerDied("w (pid 4) was killed by SIGKILL", "w", 4, -9)
    copy = pickle.loads(pickle.dumps(died))
    assert (str(copy), copy.name, copy.pid, copy.exitcode) == (str(died), "w", 4, -9)
    assert isinstance(copy, aioipc.BrokenResourceError)
    tb = pickle.loads(pickle.dumps(aioipc.RemoteTraceback("Traceback ...")))
    assert tb.text == "Traceback ..."
    assert str(pickle.loads(pickle.dumps(aioipc.RemoteError("it")))) == "it"


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("POSIX signals", allow_module_level=True)
