"""Type-only checks of the public connection API: mypy checks this file; nothing runs it."""

from __future__ import annotations

import multiprocessing
from typing import Any

from typing_extensions import assert_type

import aioipc


async def connections() -> None:
    a, b = aioipc.Pipe()
    assert_type(a, aioipc.Connection[Any, Any])
    ints_out: aioipc.Connection[int, str] = a
    strs_out: aioipc.Connection[str, int] = b
    await ints_out.send(1)
    await ints_out.send("no")  # type: ignore[arg-type]
    assert_type(await strs_out.recv(), int)
    assert_type(await strs_out.recv_bytes(), bytes)
    async for message in ints_out:
        assert_type(message, str)
    async with strs_out as same:
        assert_type(same, aioipc.Connection[str, int])
    assert_type(strs_out.poll(), bool)
    assert_type(strs_out.statistics(), aioipc.ConnectionStatistics)
    assert_type(strs_out.sync, multiprocessing.connection.Connection)
    assert_type(aioipc.Connection.wrap(multiprocessing.Pipe()[0]), aioipc.Connection[Any, Any])


async def listeners() -> None:
    async with aioipc.listen(authkey=b"key") as listener:
        assert_type(listener, aioipc.Listener)
        assert_type(await listener.accept(), aioipc.Connection[Any, Any])
        async for conn in listener:
            assert_type(conn, aioipc.Connection[Any, Any])
        assert_type(listener.statistics(), aioipc.ListenerStatistics)
    assert_type(await aioipc.connect(("127.0.0.1", 1), authkey=b"key"), aioipc.Connection[Any, Any])
