"""aioipc.listen and aioipc.connect: across hosts, on multiprocessing's Listener and Client."""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import multiprocessing.connection
import pickle
import random
import socket
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioipc
from aioipc import InsecureListenerWarning

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KEY = b"the key"


async def connect_and_accept(
    listener: aioipc.Listener, **options: Any
) -> tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]]:
    """(the accepted end, the connecting end)."""
    options.setdefault("authkey", KEY)
    async with anyio.create_task_group() as tg:
        ends: list[aioipc.Connection[Any, Any]] = []

        async def connect() -> None:
            ends.append(await aioipc.connect(listener.address, **options))

        tg.start_soon(connect)
        accepted = await listener.accept()
    return accepted, ends[0]


async def wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.01)


# -- connecting --


async def test_connect_and_accept_talk_over_loopback_tcp_with_an_authkey() -> None:
    async with aioipc.listen(authkey=KEY) as listener:
        assert listener.address[0] == "127.0.0.1"
        server, client = await connect_and_accept(listener)
        async with server, client:
            await client.send("hello")
            assert await server.recv() == "hello"
            await server.send_bytes(b"x" * 1_000_000)
            assert await client.recv_bytes() == b"x" * 1_000_000


async def test_async_for_accepts_one_peer_after_another() -> None:
    async with aioipc.listen(authkey=KEY) as listener, anyio.create_task_group() as tg:

        async def connect_and_say(i: int) -> None:
            async with await aioipc.connect(listener.address, authkey=KEY) as conn:
                await conn.send(i)

        for i in range(3):
            tg.start_soon(connect_and_say, i)
        heard = []
        async for conn in listener:
            async with conn:
                heard.append(await conn.recv())
            if len(heard) == 3:
                break
    assert sorted(heard) == [0, 1, 2]


async def test_a_unix_socket_path_needs_no_authkey_and_is_removed_on_close(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    async with aioipc.listen(path) as listener:
        assert listener.address == path
        server, client = await connect_and_accept(listener, authkey=None)
        async with server, client:
            await client.send("over a unix socket")
            assert await server.recv() == "over a unix socket"
    assert not await anyio.Path(path).exists()


async def test_a_child_process_connects_with_the_authkey(ctx: Any) -> None:
    async with aioipc.listen(authkey=KEY) as listener:
        process = ctx.Process(target=connect_and_send_in_child, args=(listener.address, KEY))
        process.start()
        try:
            with anyio.fail_after(30):
                async with await listener.accept() as conn:
                    assert await conn.recv() == "from the child"
                    with pytest.raises(EOFError):
                        await conn.recv()
        finally:
            await anyio.to_thread.run_sync(process.join)
    assert process.exitcode == 0


def connect_and_send_in_child(address: Any, authkey: bytes) -> None:
    async def main() -> None:
        async with await aioipc.connect(address, authkey=authkey) as conn:
            await conn.send("from the child")

    asyncio.run(main())


# -- interoperating with plain multiprocessing --


async def test_a_plain_multiprocessing_client_connects_to_listen() -> None:
    async with aioipc.listen(authkey=KEY) as listener:
        clients: list[multiprocessing.connection.Connection[Any, Any]] = []

        def connect_plainly() -> None:
            clients.append(multiprocessing.connection.Client(listener.address, authkey=KEY))

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, connect_plainly)
            server = await listener.accept()
        async with server:
            clients[0].send("plain")
            assert await server.recv() == "plain"
            await server.send("async")
            assert clients[0].recv() == "async"
        clients[0].close()


async def test_connect_reaches_a_plain_multiprocessing_listener() -> None:
    with multiprocessing.connection.Listener(("127.0.0.1", 0), authkey=KEY) as plain:
        accepted: list[multiprocessing.connection.Connection[Any, Any]] = []

        async def accept_in_a_thread() -> None:
            accepted.append(await anyio.to_thread.run_sync(plain.accept))

        async with anyio.create_task_group() as tg:
            tg.start_soon(accept_in_a_thread)
            conn = await aioipc.connect(plain.address, authkey=KEY)
        async with conn:
            await conn.send("async")
            assert accepted[0].recv() == "async"
            accepted[0].send("plain")
            assert await conn.recv() == "plain"
        accepted[0].close()


# -- authentication --


async def test_tcp_needs_an_authkey_unless_the_caller_opts_out() -> None:
    with pytest.raises(ValueError, match="authkey is required"):
        aioipc.listen(("127.0.0.1", 0))
    with pytest.raises(ValueError, match="authkey is required"):
        await aioipc.connect(("127.0.0.1", 1))
    async with aioipc.listen(("127.0.0.1", 0), insecure=True) as listener:
        server, client = await connect_and_accept(listener, authkey=None, insecure=True)
        async with server, client:
            await client.send("anyone")
            assert await server.recv() == "anyone"


async def test_an_abstract_unix_socket_needs_an_authkey() -> None:
    with pytest.raises(ValueError, match="authkey is required"):
        aioipc.listen("\0aioipc-test-abstract")


async def test_an_authkey_must_be_bytes() -> None:
    with pytest.raises(TypeError, match="authkey must be bytes"):
        aioipc.listen(authkey="text")  # type: ignore[arg-type]


async def test_a_peer_with_the_wrong_key_is_refused_and_the_listener_serves_the_next() -> None:
    async with aioipc.listen(authkey=KEY) as listener, anyio.create_task_group() as tg:
        tg.start_soon(_accept_and_close, listener)
        with pytest.raises(multiprocessing.AuthenticationError):
            await aioipc.connect(listener.address, authkey=b"wrong")
        await wait_until(lambda: listener.statistics().refused == 1)
        async with await aioipc.connect(listener.address, authkey=KEY) as conn:
            await conn.send("right key")


async def _accept_and_close(listener: aioipc.Listener) -> None:
    async with await listener.accept() as conn:
        assert await conn.recv() == "right key"


@pytest.mark.blocks_on_the_loop  # the misbehaving peer is a plain blocking socket
async def test_a_peer_that_stalls_the_handshake_delays_no_one() -> None:
    async with (
        aioipc.listen(authkey=KEY, handshake_timeout=30) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_accept_and_close, listener)  # peers are taken while someone accepts
        with socket.create_connection(listener.address):  # connects, then says nothing
            await wait_until(lambda: listener.statistics().handshakes == 1)
            async with await aioipc.connect(listener.address, authkey=KEY) as conn:
                await conn.send("right key")
            assert listener.statistics().handshakes == 1  # the stalled one still waits


@pytest.mark.blocks_on_the_loop  # the misbehaving peer is a plain blocking socket
async def test_a_peer_that_stalls_the_handshake_times_out() -> None:
    async with aioipc.listen(authkey=KEY, handshake_timeout=0.2) as listener:
        with socket.create_connection(listener.address) as stalled:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_accept_and_close, listener)
                await wait_until(lambda: listener.statistics().timed_out == 1)
                assert listener.statistics().handshakes == 0
                assert await anyio.to_thread.run_sync(_read_to_eof, stalled) > 0  # the challenge
                async with await aioipc.connect(listener.address, authkey=KEY) as conn:
                    await conn.send("right key")
        assert listener.statistics().refused == 0


def _read_to_eof(sock: socket.socket) -> int:
    """Read until the peer closes; how many bytes came."""
    total = 0
    while chunk := sock.recv(4096):
        total += len(chunk)
    return total


@pytest.mark.blocks_on_the_loop  # the misbehaving peer is a plain blocking socket
async def test_the_handshake_deadline_covers_the_whole_handshake_not_each_read() -> None:
    async with (
        aioipc.listen(authkey=KEY, handshake_timeout=0.5) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_accept_and_close, listener)
        with socket.create_connection(listener.address) as dripping:
            dripping.sendall((100).to_bytes(4, "big"))  # announces a 100-byte response
            with anyio.fail_after(20):
                # A byte every 0.05 s: each read comes well within the timeout, the whole not.
                while listener.statistics().timed_out == 0:
                    try:
                        dripping.send(b"x")
                    except OSError:  # closed by the listener
                        break
                    await anyio.sleep(0.05)
            await wait_until(lambda: listener.statistics().timed_out == 1)
        assert listener.statistics().refused == 0
        async with await aioipc.connect(listener.address, authkey=KEY) as conn:
            await conn.send("right key")


@pytest.mark.blocks_on_the_loop  # the misbehaving peer is a plain blocking socket
async def test_connect_gives_up_on_a_peer_that_never_answers_the_handshake() -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:
        address = mute.getsockname()
        with pytest.raises(TimeoutError, match="handshake"):
            await aioipc.connect(address, authkey=KEY, handshake_timeout=0.2)
        mute.accept()[0].close()


async def test_connect_to_an_address_where_nobody_listens_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        address = placeholder.getsockname()
    with pytest.raises(ConnectionRefusedError):
        await aioipc.connect(address, authkey=KEY)


# -- accepting, cancelling, closing --


async def test_accepts_cancelled_while_a_peer_connects_lose_no_peer() -> None:
    rng = random.Random(3)
    async with aioipc.listen(authkey=KEY) as listener, anyio.create_task_group() as tg:

        async def connect_and_send() -> None:
            async with await aioipc.connect(listener.address, authkey=KEY) as client:
                await client.send("kept")

        tg.start_soon(connect_and_send)
        server = None
        with anyio.fail_after(10):
            while server is None:
                with anyio.move_on_after(rng.uniform(0, 0.002)):
                    server = await listener.accept()
        async with server:
            assert await server.recv() == "kept"


async def test_close_wakes_a_waiting_accept_and_ends_async_for() -> None:
    listener = aioipc.listen(authkey=KEY)
    async with anyio.create_task_group() as tg:

        async def close_soon() -> None:
            await anyio.sleep(0.05)
            await listener.aclose()

        tg.start_soon(close_soon)
        with anyio.fail_after(5):
            assert [conn async for conn in listener] == []
    with pytest.raises(aioipc.ClosedResourceError):
        await listener.accept()


def test_a_listener_cannot_be_sent_to_another_process() -> None:
    listener = aioipc.listen(authkey=KEY)
    try:
        with pytest.raises(TypeError, match="listen there instead"):
            pickle.dumps(listener)
    finally:
        listener.close()


def test_repr_and_statistics_describe_the_listener() -> None:
    listener = aioipc.listen(authkey=KEY)
    assert repr(listener).startswith(f"<aioipc.Listener address={listener.address!r} at")
    assert listener.statistics() == aioipc.ListenerStatistics(
        waiting_acceptors=0,
        handshakes=0,
        refused=0,
        threads=0,
        timed_out=0,
        dropped=0,
        accept_errors=0,
    )
    listener.close()
    assert repr(listener).startswith("<aioipc.Listener closed at")


# -- arguments --


@pytest.mark.parametrize("seconds", [0, -1, 0.0, math.inf, math.nan])
async def test_a_handshake_timeout_must_be_finite_and_positive(seconds: float) -> None:
    with pytest.raises(ValueError, match=rf"handshake_timeout .* not {seconds!r}"):
        aioipc.listen(authkey=KEY, handshake_timeout=seconds)
    with pytest.raises(ValueError, match=rf"handshake_timeout .* not {seconds!r}"):
        await aioipc.connect(("127.0.0.1", 1), authkey=KEY, handshake_timeout=seconds)


@pytest.mark.parametrize("seconds", ["10", None, True])
async def test_a_handshake_timeout_must_be_a_number(seconds: Any) -> None:
    with pytest.raises(TypeError, match="handshake_timeout must be a number"):
        aioipc.listen(authkey=KEY, handshake_timeout=seconds)
    with pytest.raises(TypeError, match="handshake_timeout must be a number"):
        await aioipc.connect(("127.0.0.1", 1), authkey=KEY, handshake_timeout=seconds)


async def test_an_empty_authkey_is_refused_because_it_authenticates_anyone() -> None:
    with pytest.raises(ValueError, match="authkey=b'' is refused"):
        aioipc.listen(("0.0.0.0", 0), authkey=b"")
    with pytest.raises(ValueError, match="authkey=b'' is refused"):
        await aioipc.connect(("127.0.0.1", 1), authkey=b"")


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("max_handshakes", 0, ValueError),
        ("max_handshakes", 1.5, TypeError),
        ("backlog", -1, ValueError),
        ("backlog", "64", TypeError),
        ("insecure", "yes", TypeError),
    ],
)
def test_listen_refuses_other_bad_arguments_naming_them(
    name: str, value: object, error: type[Exception]
) -> None:
    arguments: dict[str, Any] = {name: value}
    with pytest.raises(error, match=rf"{name} must .*{value!r}"):
        aioipc.listen(authkey=KEY, **arguments)


def test_insecure_beyond_loopback_warns() -> None:
    with pytest.warns(InsecureListenerWarning, match="without an authkey"):
        listener = aioipc.listen(("0.0.0.0", 0), insecure=True)
    listener.close()


def test_insecure_on_loopback_or_with_an_authkey_does_not_warn() -> None:
    # filterwarnings=error turns any warning here into a failure
    aioipc.listen(("127.0.0.1", 0), insecure=True).close()
    aioipc.listen(("0.0.0.0", 0), authkey=KEY, insecure=True).close()


def test_the_address_stays_readable_after_close() -> None:
    listener = aioipc.listen(authkey=KEY)
    address = listener.address
    listener.close()
    assert listener.address == address


def test_a_refused_insecure_listener_leaves_no_socket_open() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureListenerWarning)
        with pytest.raises(InsecureListenerWarning):
            aioipc.listen(("0.0.0.0", 0), insecure=True)
    gc.collect()  # an unclosed socket would warn (an error here) when collected


# -- connecting to a hostile listener --


async def _serve_once(server: socket.socket, behave: Callable[[socket.socket], None]) -> None:
    def run() -> None:
        peer, _ = server.accept()
        with peer:
            behave(peer)

    await anyio.to_thread.run_sync(run)


async def test_connect_refuses_a_handshake_message_announced_too_large() -> None:
    def announce_2_gib(peer: socket.socket) -> None:
        peer.sendall((2**31 - 1).to_bytes(4, "big"))
        peer.recv(1)  # until the client closes

    with socket.create_server(("127.0.0.1", 0)) as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_once, server, announce_2_gib)
            with pytest.raises(multiprocessing.AuthenticationError, match="2147483647 bytes"):
                await aioipc.connect(server.getsockname(), authkey=KEY, handshake_timeout=30)


async def test_connect_bounds_the_whole_handshake_with_one_deadline() -> None:
    stop = threading.Event()

    def drip(peer: socket.socket) -> None:
        peer.sendall((200).to_bytes(4, "big"))
        while not stop.wait(0.05):  # a byte every 0.05 s: 10 s in all
            try:
                peer.sendall(b"x")
            except OSError:
                return

    with socket.create_server(("127.0.0.1", 0)) as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_once, server, drip)
            try:
                with pytest.raises(TimeoutError, match="handshake"):
                    await aioipc.connect(server.getsockname(), authkey=KEY, handshake_timeout=0.5)
            finally:
                stop.set()


async def test_connect_raises_connectionreseterror_when_the_listener_hangs_up() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_once, server, lambda peer: None)
            with pytest.raises(ConnectionResetError, match="during the handshake"):
                await aioipc.connect(server.getsockname(), authkey=KEY)
