"""The exceptions: their families, and their survival of a trip to another process."""

from __future__ import annotations

import asyncio
import pickle
import queue
import sys

import anyio
import pytest

import aioipc

ALL_EXCEPTIONS = [
    aioipc.Empty,
    aioipc.Full,
    aioipc.ShutDown,
    aioipc.ClosedResourceError,
    aioipc.BrokenResourceError,
    aioipc.BusyResourceError,
]


@pytest.mark.parametrize("cls", ALL_EXCEPTIONS)
def test_exception_survives_a_pickle_round_trip_with_its_message(cls: type[Exception]) -> None:
    exc = cls("worker 'w1' exited with code -9")
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is cls
    assert str(clone) == str(exc)
    assert clone.args == exc.args


@pytest.mark.parametrize("cls", ALL_EXCEPTIONS)
def test_exception_is_named_after_the_public_module(cls: type[Exception]) -> None:
    assert cls.__module__ == "aioipc"
    assert getattr(aioipc, cls.__name__) is cls


def test_empty_is_both_a_queue_empty_and_an_asyncio_queue_empty() -> None:
    assert issubclass(aioipc.Empty, queue.Empty)
    assert issubclass(aioipc.Empty, asyncio.QueueEmpty)


def test_full_is_both_a_queue_full_and_an_asyncio_queue_full() -> None:
    assert issubclass(aioipc.Full, queue.Full)
    assert issubclass(aioipc.Full, asyncio.QueueFull)


def test_shutdown_joins_the_stdlib_shutdown_families_where_python_has_them() -> None:
    families = [getattr(queue, "ShutDown", None), getattr(asyncio, "QueueShutDown", None)]
    expected = [family for family in families if family is not None]
    assert len(expected) == (2 if sys.version_info >= (3, 13) else 0)
    for family in expected:
        assert issubclass(aioipc.ShutDown, family)
    assert issubclass(aioipc.ShutDown, Exception)


def test_closed_and_broken_are_the_anyio_errors_of_the_same_name() -> None:
    assert issubclass(aioipc.ClosedResourceError, anyio.ClosedResourceError)
    assert issubclass(aioipc.BrokenResourceError, anyio.BrokenResourceError)
    assert not issubclass(aioipc.ClosedResourceError, aioipc.BrokenResourceError)


def test_busy_is_the_anyio_error_of_the_same_name_and_keeps_its_message() -> None:
    assert issubclass(aioipc.BusyResourceError, anyio.BusyResourceError)
    exc = aioipc.BusyResourceError("this end is being received from on another loop")
    assert str(pickle.loads(pickle.dumps(exc))) == "this end is being received from on another loop"
