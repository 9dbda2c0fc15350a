"""Fixtures shared by the whole suite.

- ``anyio_backend``: every ``@pytest.mark.anyio`` test runs on asyncio (debug mode), uvloop and
  trio.
- ``ctx``: a multiprocessing context, parametrised over fork, forkserver and spawn by the tests that
  ask for it.
- An autouse check fails any test that leaves child processes or aioipc threads behind.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

BACKENDS: list[Any] = [
    pytest.param(("asyncio", {"debug": True}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform != "win32":
    import uvloop

    BACKENDS.insert(
        1, pytest.param(("asyncio", {"loop_factory": uvloop.new_event_loop}), id="uvloop")
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
