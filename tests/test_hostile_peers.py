"""The listener under attack: hostile peers on loopback are refused, timed out or dropped, and good
peers are served meanwhile.

Every count here is bounded and every wait is for an event, never for an amount of time: the
attacks are shaped so that the outcome does not depend on the machine's speed (see
``test_a_good_client_is_served_through_an_attack`` for why the good client cannot be dropped).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

import aioipc

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KEY = b"the right key"
HTTP_GARBAGE = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"


async def wait_until(condition: Callable[[], bool], seconds: float = 20) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


def read_until_closed(sock: socket.socket) -> bytes:
    """What the listener sends before it closes the connection (blocking)."""
    sock.settimeout(30)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


async def serve_echo(listener: aioipc.Listener) -> None:
    """Accept peers one after another; answer each message with itself."""
    async for conn in listener:
        async with conn:
            try:
                async for message in conn:
                    await conn.send(message)
            except (EOFError, aioipc.BrokenResourceError, BrokenPipeError):
                pass


async def exchange(address: Any, rounds: int) -> float:
    """Connect with the right key, exchange ``rounds`` messages; the seconds connect() took."""
    started = time.perf_counter()
    conn = await aioipc.connect(address, authkey=KEY, handshake_timeout=30)
    took = time.perf_counter() - started
    async with conn:
        for i in range(rounds):
            await conn.send(("ping", i))
            assert await conn.recv() == ("ping", i)
    return took


# -- one kind of peer at a time --


@pytest.mark.blocks_on_the_loop  # the hostile peers are plain blocking sockets
async def test_garbage_is_refused_at_once() -> None:
    async with aioipc.listen(authkey=KEY, handshake_timeout=30) as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_echo, listener)
            with socket.create_connection(listener.address) as peer:
                peer.sendall(HTTP_GARBAGE)
                received = await anyio.to_thread.run_sync(read_until_closed, peer)
            assert received.startswith(struct.pack("!i", len(received) - 4))  # the challenge
            assert b"#CHALLENGE#" in received
            await wait_until(lambda: listener.statistics().refused == 1)
            await exchange(listener.address, 1)
            tg.cancel_scope.cancel()
        assert listener.statistics().timed_out == 0


@pytest.mark.parametrize(
    "header",
    [struct.pack("!i", 257), struct.pack("!i", 2**31 - 1), struct.pack("!iQ", -1, 2**40)],
    ids=["257-bytes", "2GiB", "1TiB-long-header"],
)
@pytest.mark.blocks_on_the_loop  # the hostile peers are plain blocking sockets
async def test_a_handshake_message_announced_too_large_is_refused_before_reading_it(
    header: bytes,
) -> None:
    async with aioipc.listen(authkey=KEY, handshake_timeout=30) as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_echo, listener)
            with socket.create_connection(listener.address) as peer:
                peer.sendall(header)  # and never the body: only a refusal can end this at once
                await anyio.to_thread.run_sync(read_until_closed, peer)
            await wait_until(lambda: listener.statistics().refused == 1)
            tg.cancel_scope.cancel()
        assert listener.statistics().timed_out == 0


async def test_a_peer_with_the_wrong_key_is_refused_with_authenticationerror() -> None:
    async with aioipc.listen(authkey=KEY) as listener, anyio.create_task_group() as tg:
        tg.start_soon(serve_echo, listener)
        with pytest.raises(multiprocessing.AuthenticationError, match="rejected"):
            await anyio.to_thread.run_sync(
                lambda: multiprocessing.connection.Client(listener.address, authkey=b"wrong")
            )
        with pytest.raises(multiprocessing.AuthenticationError, match="rejected"):
            await aioipc.connect(listener.address, authkey=b"wrong")
        await wait_until(lambda: listener.statistics().refused == 2)
        tg.cancel_scope.cancel()


@pytest.mark.blocks_on_the_loop  # the hostile peers are plain blocking sockets
async def test_a_flood_of_silent_peers_makes_the_oldest_give_way_and_good_peers_get_in() -> None:
    async with (
        aioipc.listen(authkey=KEY, handshake_timeout=30, max_handshakes=4) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve_echo, listener)
        with ExitStack() as stack:
            for _ in range(10):
                stack.enter_context(socket.create_connection(listener.address))
            await wait_until(lambda: listener.statistics().dropped == 6)
            assert listener.statistics().handshakes == 4
            await exchange(listener.address, 3)
            assert listener.statistics().dropped == 7
        tg.cancel_scope.cancel()


@pytest.mark.blocks_on_the_loop  # the hostile peers are plain blocking sockets
async def test_a_peer_that_proved_the_key_is_not_dropped_to_make_room() -> None:
    """A peer that answered the challenge right stays; with no room left, the newcomer goes."""
    async with (
        aioipc.listen(authkey=KEY, handshake_timeout=30, max_handshakes=1) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve_echo, listener)
        sock = socket.create_connection(listener.address)
        proven = multiprocessing.connection.Connection(sock.detach())
        await anyio.to_thread.run_sync(multiprocessing.connection.answer_challenge, proven, KEY)
        with socket.create_connection(listener.address) as newcomer:
            assert await anyio.to_thread.run_sync(read_until_closed, newcomer) == b""
        assert listener.statistics().dropped == 1
        assert listener.statistics().handshakes == 1
        # the proven peer goes on: it challenges the listener in turn, then talks
        await anyio.to_thread.run_sync(multiprocessing.connection.deliver_challenge, proven, KEY)
        proven.send("still here")
        assert await anyio.to_thread.run_sync(proven.recv) == "still here"
        proven.close()
        tg.cancel_scope.cancel()


@pytest.mark.blocks_on_the_loop  # the hostile peers are plain blocking sockets
async def test_handshakes_in_progress_take_no_thread_each() -> None:
    async with (
        aioipc.listen(authkey=KEY, handshake_timeout=30, max_handshakes=200) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve_echo, listener)
        await wait_until(lambda: listener.statistics().threads == 1)  # the accepting thread
        threads_before = threading.active_count()
        with ExitStack() as stack:
            for _ in range(100):
                stack.enter_context(socket.create_connection(listener.address))
            await wait_until(lambda: listener.statistics().handshakes == 100)
            assert threading.active_count() == threads_before
            assert listener.statistics().threads == 1
        tg.cancel_scope.cancel()


# -- everything at once --


def drip(address: Any) -> None:
    """Announce a 200-byte answer, then send it one byte every 0.1 s (20 s in all), until the
    listener closes the connection."""
    with socket.create_connection(address) as sock:
        sock.sendall(struct.pack("!i", 200))
        for _ in range(200):
            time.sleep(0.1)
            try:
                sock.sendall(b"x")
            except OSError:  # the listener closed it
                return


def send_and_wait_for_close(address: Any, data: bytes) -> None:
    with socket.create_connection(address) as sock:
        sock.sendall(data)
        read_until_closed(sock)


def wrong_key(address: Any, outcomes: list[str]) -> None:
    try:
        multiprocessing.connection.Client(address, authkey=b"wrong key").close()
    except multiprocessing.AuthenticationError:
        outcomes.append("AuthenticationError")
    else:
        outcomes.append("accepted")


@asynccontextmanager
async def attackers(address: Any, outcomes: list[str]) -> AsyncIterator[None]:
    """Garbage, slow-drip, wrong-key and oversized-length peers, in threads; joined on exit."""
    threads = [threading.Thread(target=drip, args=(address,)) for _ in range(4)]
    wrong_answer = struct.pack("!i", 16) + os.urandom(16)  # the right size, a made-up digest
    for i in range(8):
        threads += [
            threading.Thread(target=send_and_wait_for_close, args=(address, HTTP_GARBAGE)),
            threading.Thread(target=send_and_wait_for_close, args=(address, wrong_answer)),
            threading.Thread(
                target=send_and_wait_for_close, args=(address, struct.pack("!i", 2**31 - 1 - i))
            ),
            threading.Thread(target=wrong_key, args=(address, outcomes)),
        ]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join)


FLOOD = 100
MAX_HANDSHAKES = 64
GOOD_CLIENTS = 20
#: Peers that connect during the attack phase: 4 drip, 8 garbage, 8 wrong answers, 8 oversized,
#: 8 wrong key, and the good clients.
ATTACK_PHASE_PEERS = 36 + GOOD_CLIENTS


@pytest.mark.blocks_on_the_loop  # the hostile peers are plain blocking sockets
async def test_a_good_client_is_served_through_an_attack() -> None:
    """While the handshake table is full of a flood's silent peers, hostile peers of every kind
    connect and a good client connects 20 times and exchanges messages each time.

    Why the good client cannot be dropped, however slow the machine: a newcomer finding the table
    full drops the *oldest* peer that has not answered the challenge. Every flood peer is older
    than the good client; for the good client to be the oldest, those would have to be gone and
    63 peers newer than it in the table, but fewer than ATTACK_PHASE_PEERS < MAX_HANDSHAKES
    arrive during the whole attack phase.
    """
    assert ATTACK_PHASE_PEERS < MAX_HANDSHAKES
    outcomes: list[str] = []
    latencies: list[float] = []
    async with aioipc.listen(
        authkey=KEY, handshake_timeout=5, max_handshakes=MAX_HANDSHAKES, backlog=256
    ) as listener:
        address = listener.address
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_echo, listener)
            with ExitStack() as flood:
                for _ in range(FLOOD):  # silent peers: connect and say nothing
                    flood.enter_context(socket.create_connection(address))

                def all_accepted() -> bool:
                    stats = listener.statistics()
                    return stats.handshakes + stats.dropped + stats.timed_out == FLOOD

                await wait_until(all_accepted)
                stats = listener.statistics()
                assert stats.handshakes <= MAX_HANDSHAKES
                assert stats.dropped + stats.timed_out >= FLOOD - MAX_HANDSHAKES
                async with attackers(address, outcomes):
                    for _ in range(GOOD_CLIENTS):
                        latencies.append(await exchange(address, 5))
            await wait_until(lambda: listener.statistics().handshakes == 0)
            tg.cancel_scope.cancel()
        stats = listener.statistics()
    assert listener.statistics().threads == 0
    assert len(latencies) == GOOD_CLIENTS
    assert outcomes == ["AuthenticationError"] * 8
    hostile = FLOOD + ATTACK_PHASE_PEERS - GOOD_CLIENTS
    assert stats.refused + stats.timed_out + stats.dropped == hostile
    assert stats.refused >= 32  # garbage, wrong answers, oversized and wrong-key peers
    assert stats.timed_out >= 4  # the drips
    print(
        f"good client's connect() under attack: median {sorted(latencies)[len(latencies) // 2]:.4f}"
        f" s, max {max(latencies):.4f} s; {stats}"
    )


# -- accept() failures --


def accept_through_emfile(conn: multiprocessing.connection.Connection[Any, Any]) -> None:
    """In a child: a peer connects while the process has no descriptor left; once some are free
    again, it is accepted."""

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logging.getLogger("aioipc").addHandler(Keep())

    def connect_plainly(sock: socket.socket, go: threading.Event, address: Any) -> None:
        go.wait()
        sock.connect(address)  # the kernel completes it; accept() is what fails
        client = multiprocessing.connection.Connection(sock.detach())
        multiprocessing.connection.answer_challenge(client, KEY)
        multiprocessing.connection.deliver_challenge(client, KEY)
        client.send("through")
        client.close()

    async def main() -> str:
        async with aioipc.listen(authkey=KEY) as listener:
            with anyio.move_on_after(0.01):  # starts the accepting thread while fds are there
                await listener.accept()
            go = threading.Event()
            sock = socket.socket()
            client = threading.Thread(target=connect_plainly, args=(sock, go, listener.address))
            client.start()
            hoard = []
            try:
                while True:
                    hoard.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            go.set()
            with anyio.fail_after(20):
                while listener.statistics().accept_errors < 3:
                    await anyio.sleep(0.01)
            for fd in hoard:
                os.close(fd)
            with anyio.fail_after(20):
                async with await listener.accept() as server:
                    message = await server.recv()
            await anyio.to_thread.run_sync(client.join)
            warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
            assert all("accept() failed" in w and "Too many open files" in w for w in warnings)
            return f"{message} {len(warnings) >= 3} {listener.statistics().accept_errors >= 3}"

    conn.send(anyio.run(main))


async def test_accept_errors_from_exhausted_descriptors_are_logged_and_retried() -> None:
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=accept_through_emfile, args=(writer,))
    process.start()
    writer.close()
    try:
        assert await anyio.to_thread.run_sync(reader.poll, 50)
        assert reader.recv() == "through True True"
    finally:
        await anyio.to_thread.run_sync(process.join, 30)
        reader.close()
    assert process.exitcode == 0
