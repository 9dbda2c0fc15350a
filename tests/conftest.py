"""Fixtures shared by the whole suite.

- ``anyio_backend``: every ``@pytest.mark.anyio`` test runs on asyncio and uvloop (both in debug
  mode) and trio.
- ``ctx``: a multiprocessing context, parametrised over fork, forkserver and spawn by the tests that
  ask for it.
- An autouse check fails any test that leaves child processes or aioipc threads behind.
- Another fails an asyncio or uvloop test that makes a blocking call on the event loop's thread
  (blockbuster), except the few bounded ones allowed in ``allow_bounded_blocking``. A test that
  blocks on purpose says so with ``@pytest.mark.blocks_on_the_loop``.
"""

from __future__ import annotations

import gc
import multiprocessing
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

import aioipc

pytest_plugins = ["pytester"]

BACKENDS: list[Any] = [
    pytest.param(("asyncio", {"debug": True}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform != "win32":
    import uvloop

    BACKENDS.insert(
        1,
        pytest.param(
            ("asyncio", {"loop_factory": uvloop.new_event_loop, "debug": True}), id="uvloop"
        ),
    )

START_METHODS = [
    m for m in ("fork", "forkserver", "spawn") if m in multiprocessing.get_all_start_methods()
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    """A multiprocessing context for each start method."""
    return multiprocessing.get_context(request.param)


def _aioipc_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("aioipc-") and t.is_alive()}


@pytest.fixture(autouse=True)
def collect_cycles_at_the_end() -> Iterator[None]:
    """Collect the reference cycles a test leaves (``pytest.raises(...) as info`` makes one: the
    test's frame holds the exception, whose traceback holds the frame) when the test ends.

    Left to the cycle collector, they are freed at any later allocation, possibly inside a call
    into multiprocessing's resource tracker; on Python 3.13 a semaphore freed there is reported
    as "ResourceTracker called reentrantly" and fails whichever test happens to run then.
    aioipc's own raise paths leave no cycle (tests/test_reference_cycles.py). The two young
    generations hold what the test made last (a full collection after every test doubled the
    suite's time).
    """
    yield
    gc.collect(1)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves child processes or aioipc threads running."""
    threads_before = _aioipc_threads()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        children = multiprocessing.active_children()  # also reaps the finished ones
        threads = _aioipc_threads() - threads_before
        if not children and not threads:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for child in children:
        child.kill()
        child.join(5)
    pytest.fail(f"left behind: processes {children}, threads {sorted(t.name for t in threads)}")


#: The code whose blocking calls on the loop fail a test: aioipc's, and the tests' own (a
#: package-like stand-in for the tests directory, which is not a package).
_TESTS = types.ModuleType("tests")
_TESTS.__path__ = [str(Path(__file__).parent)]
GUARDED_CODE = [aioipc, _TESTS]


def allow_bounded_blocking(guard: BlockBuster) -> None:
    """The blocking calls on the loop's thread that are deliberate and bounded, each with why."""

    def allow(call: str, filename: str, *functions: str) -> None:
        guard.functions[call].can_block_in(filename, set(functions))

    # Starting a process under spawn or forkserver hands the child its preparation data through a
    # pipe or the fork server's socket, and makes a temporary directory the first time: bounded by
    # the start of the child, as with multiprocessing anywhere.
    for call in ("os.getcwd", "os.mkdir", "os.path.abspath", "os.read", "io.BufferedWriter.write"):
        allow(call, "multiprocessing/process.py", "start")
    allow("socket.socket.connect", "multiprocessing/process.py", "start")
    # subprocess.Popen reads the pipe that tells whether the child's exec worked: bounded by it.
    allow("os.read", "subprocess.py", "_execute_child")
    # A forkserver child's exit status is read from the fork server's pipe once its sentinel is
    # ready: the few bytes are there.
    allow("os.read", "multiprocessing/popen_forkserver.py", "poll")
    # Creating and freeing semaphores and shared memory tells the resource tracker with one small
    # write to its pipe, and a new shared memory arena looks at /dev/shm (a memory file system).
    allow("os.write", "multiprocessing/resource_tracker.py", "_send", "_check_alive")
    for call in ("os.statvfs", "os.path.abspath", "os.unlink"):
        allow(call, "multiprocessing/heap.py", "__init__")
    # A manager's proxy calls the manager and waits for its answer: the wrapped queue's put_nowait
    # and qsize are such round trips (Queue.wrap's docstring says so).
    allow("socket.socket.connect", "multiprocessing/managers.py", "_callmethod")
    # A send writes on the loop only what poll() has just said fits (at most PIPE_BUF bytes).
    allow("os.write", "aioipc/_connection.py", "_send_now")
    # Closing a listener removes its socket file, as multiprocessing's Listener does.
    allow("os.unlink", "aioipc/_listener.py", "close")
    # close() of a queue's reader and writer waits up to 1 s for the thread it has just woken, so
    # that the thread drops its last references here, not in a daemon thread at exit; a queue's
    # feeder thread is waited for (up to 5 s) so that what this process put is in the pipe before
    # the pipe closes, as multiprocessing.Queue does.
    allow("threading.Lock.acquire", "aioipc/_bridge.py", "close")
    allow("threading.Lock.acquire", "aioipc/_mpqueue.py", "close")
    # An immediate shutdown discards the items already in the pipe: it reads whole frames that have
    # arrived (an item still being written by its producer is waited for to its end).
    allow("os.read", "aioipc/_mpqueue.py", "_discard_queued")
    # Building a wrapped queue for a test is the test's setup (for a manager, a round trip to it).
    allow("socket.socket.connect", "tests/conftest.py", "make")
    # The tests count their open descriptors in /proc, a memory file system.
    allow("os.listdir", "tests/_helpers.py", "open_fds")
    # ... and read a process's state there, as the queue does to tell a dead lock holder from a
    # stopped or slow one.
    allow("io.BufferedReader.read", "tests/test_supervision.py", "_stat_state")
    allow("io.BufferedReader.read", "aioipc/_mpqueue.py", "_alive")
    # asyncio's debug mode logs slow callbacks; where the log goes is the application's choice.
    for call in ("io.TextIOWrapper.write", "io.BufferedWriter.write"):
        allow(call, "logging/__init__.py", "emit")


@pytest.fixture(autouse=True)
def no_blocking_on_the_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an asyncio or uvloop test whose code makes a blocking call on the event loop's thread
    (trio has no such guard: blockbuster watches asyncio's running loop)."""
    if "anyio_backend" not in request.fixturenames or request.node.get_closest_marker(
        "blocks_on_the_loop"
    ):
        yield
        return
    backend = request.getfixturevalue("anyio_backend")
    if (backend if isinstance(backend, str) else backend[0]) != "asyncio":
        yield
        return
    with blockbuster_ctx(GUARDED_CODE) as guard:
        allow_bounded_blocking(guard)
        yield


# -- queues of every kind --

#: The queues ``make_queue`` builds: aioipc's own, and the two kinds it adopts with ``wrap``, each
#: with a ``prefetch`` and a default ``maxsize`` (a bound large enough for any test that does not
#: ask for its own). Pairwise: every kind meets every prefetch and both maxsizes, and every
#: prefetch both maxsizes, in 9 configurations rather than 18.
QUEUE_CONFIGS = [
    ("own", 0, 0),
    ("own", 1, 1000),
    ("own", 8, 0),
    ("mp", 0, 1000),
    ("mp", 1, 0),
    ("mp", 8, 1000),
    ("manager", 0, 0),
    ("manager", 1, 1000),
    ("manager", 8, 1000),
]


class MakeQueue:
    """Builds queues of one kind and configuration, and closes everything it built at teardown
    (outside the event loop: a wrapped multiprocessing queue's close waits for its feeder thread,
    and a manager's shutdown for its process)."""

    def __init__(self, kind: str, prefetch: int, maxsize: int) -> None:
        self.kind = kind
        self.prefetch = prefetch
        self.maxsize = maxsize
        self._queues: list[aioipc.Queue[Any]] = []
        self._wrapped: list[Any] = []
        self._manager: Any = None

    def __call__(
        self, maxsize: int | None = None, *, prefetch: int | None = None, joinable: bool = False
    ) -> aioipc.Queue[Any]:
        """A new queue; ``maxsize`` and ``prefetch`` default to this configuration's."""
        maxsize = self.maxsize if maxsize is None else maxsize
        prefetch = self.prefetch if prefetch is None else prefetch
        cls: type[aioipc.Queue[Any]] = aioipc.JoinableQueue if joinable else aioipc.Queue
        if self.kind == "own":
            queue = cls(maxsize, prefetch=prefetch)
        else:
            queue = cls.wrap(self.make(maxsize, joinable), prefetch=prefetch)
        self._queues.append(queue)
        return queue

    def joinable(
        self, maxsize: int | None = None, *, prefetch: int | None = None
    ) -> aioipc.JoinableQueue[Any]:
        """A new joinable queue; ``maxsize`` and ``prefetch`` default to this configuration's."""
        queue = self(maxsize, prefetch=prefetch, joinable=True)
        assert isinstance(queue, aioipc.JoinableQueue)
        return queue

    def make(self, maxsize: int, joinable: bool) -> Any:
        """The multiprocessing queue or manager proxy to wrap. Building a proxy is a round trip to
        the manager, on the loop's thread when a test builds a queue: that is the test's setup,
        which the guard against blocking calls allows (see ``allow_bounded_blocking``)."""
        if self.kind == "mp":
            wrapped: Any = (multiprocessing.JoinableQueue if joinable else multiprocessing.Queue)(
                maxsize
            )
            self._wrapped.append(wrapped)
            return wrapped
        if self._manager is None:
            self._manager = multiprocessing.Manager()
        return (self._manager.JoinableQueue if joinable else self._manager.Queue)(maxsize)

    def close(self) -> None:
        for queue in self._queues:
            queue.close()
        for wrapped in self._wrapped:
            wrapped.close()
            wrapped.join_thread()
        if self._manager is not None:
            self._manager.shutdown()


@pytest.fixture(
    params=[
        pytest.param(config, id="{}-prefetch{}-maxsize{}".format(*config))
        for config in QUEUE_CONFIGS
    ]
)
def make_queue(request: pytest.FixtureRequest) -> Iterator[MakeQueue]:
    """Builds queues of each kind (aioipc's own, a wrapped ``multiprocessing.Queue``, a wrapped
    manager queue) with each ``prefetch`` and ``maxsize``."""
    factory = MakeQueue(*request.param)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def own_queue() -> Iterator[aioipc.Queue[Any]]:
    """An unbounded queue of aioipc's own, for behaviour that wrapped queues do not have."""
    queue: aioipc.Queue[Any] = aioipc.Queue()
    try:
        yield queue
    finally:
        queue.close()
