"""aioipc.Connection and aioipc.Pipe within one process: the async face of multiprocessing pipes."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import aioipc
from aioipc import _connection, _wire

pytestmark = pytest.mark.anyio

#: Payload sizes that take each receiving path: read whole on the loop, assembled on the loop over
#: several reads, finished by the reader thread.
SIZES = [10, 5_000, 100_000, 3_000_000]

PipeFactory = Callable[..., "tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]]"]


@pytest.fixture(params=["readiness", "reader-thread", "no-rwf-nowait"])
def make_pipe(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> PipeFactory:
    """Pipes whose ends receive on each path: the loop's readiness (the default on Linux), the
    reader thread alone (as on other systems), or readiness without RWF_NOWAIT (older kernels)."""
    if request.param == "no-rwf-nowait":
        monkeypatch.setattr(_wire, "_nowait_reads", False)
        monkeypatch.setattr(_connection, "_nowait_writes", False)

    def make(
        duplex: bool = True,
    ) -> tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]]:
        a, b = multiprocessing.Pipe(duplex)
        readiness = request.param != "reader-thread"
        return (
            aioipc.Connection(a, _readiness=readiness),
            aioipc.Connection(b, _readiness=readiness),
        )

    return make


@pytest.fixture
def pipe() -> Iterator[tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]]]:
    a, b = aioipc.Pipe()
    yield a, b
    a.close()
    b.close()


# -- sending and receiving --


async def test_objects_and_bytes_go_both_ways_in_order(make_pipe: PipeFactory) -> None:
    a, b = make_pipe()
    async with a, b:
        await a.send({"n": 1})
        await a.send_bytes(b"raw")
        await b.send([1, 2, 3])
        assert await b.recv() == {"n": 1}
        assert await b.recv_bytes() == b"raw"
        assert await a.recv() == [1, 2, 3]


async def test_messages_of_every_size_arrive_whole_and_in_order(make_pipe: PipeFactory) -> None:
    a, b = make_pipe()
    payloads = [os.urandom(size) for size in SIZES for _ in range(2)]
    random.Random(1).shuffle(payloads)
    async with a, b, anyio.create_task_group() as tg:

        async def send_all() -> None:
            for payload in payloads:
                await a.send_bytes(payload)

        tg.start_soon(send_all)
        assert [await b.recv_bytes() for _ in payloads] == payloads


async def test_one_way_pipe_gives_the_receiving_end_first() -> None:
    receiver, sender = aioipc.Pipe(duplex=False)
    async with receiver, sender:
        assert (receiver.readable, receiver.writable) == (True, False)
        assert (sender.readable, sender.writable) == (False, True)
        await sender.send("one way")
        assert await receiver.recv() == "one way"
        with pytest.raises(OSError, match="read-only"):
            await receiver.send("back")
        with pytest.raises(OSError, match="write-only"):
            await sender.recv()


async def test_send_bytes_sends_the_slice_given_by_offset_and_size(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    await a.send_bytes(b"0123456789", 2, 5)
    await a.send_bytes(bytearray(b"0123456789"), 7)
    await a.send_bytes(memoryview(b"abc"), size=0)
    assert [await b.recv_bytes() for _ in range(3)] == [b"23456", b"789", b""]


@pytest.mark.parametrize(
    ("offset", "size", "message"),
    [
        (-1, None, "negative"),
        (11, None, "< offset"),
        (0, -1, "negative"),
        (5, 6, "offset \\+ size"),
    ],
)
async def test_send_bytes_rejects_a_slice_outside_the_buffer(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
    offset: int,
    size: int | None,
    message: str,
) -> None:
    a, _ = pipe
    with pytest.raises(ValueError, match=message):
        await a.send_bytes(b"0123456789", offset, size)


async def test_send_bytes_takes_any_buffer_as_bytes(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    import array

    a, b = pipe
    numbers = array.array("i", [1, 2, 3])
    await a.send_bytes(numbers)
    assert await b.recv_bytes() == numbers.tobytes()


async def test_an_unpicklable_object_raises_at_send_naming_its_type_and_the_pipe_goes_on(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    with pytest.raises(TypeError, match=r"_thread\.lock"):
        await a.send(threading.Lock())
    await a.send("next")
    assert await b.recv() == "next"


class Unloadable:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())


def _refuse() -> None:
    raise ValueError("cannot be rebuilt here")


async def test_a_message_that_cannot_be_unpickled_raises_at_recv_and_the_next_one_arrives(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    await a.send(Unloadable())
    await a.send("next")
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        await b.recv()
    assert await b.recv() == "next"


async def test_recv_bytes_past_maxlength_raises_and_the_connection_keeps_its_framing(
    make_pipe: PipeFactory,
) -> None:
    a, b = make_pipe()
    async with a, b:
        await a.send_bytes(b"x" * 100)
        await a.send_bytes(b"y" * 10)
        with pytest.raises(OSError, match="bad message length"):
            await b.recv_bytes(99)
        assert await b.recv_bytes(10) == b"y" * 10
        with pytest.raises(ValueError, match="negative maxlength"):
            await b.recv_bytes(-1)


# -- end of file --


async def test_recv_raises_eoferror_after_the_messages_sent_before_the_other_end_closed(
    make_pipe: PipeFactory,
) -> None:
    a, b = make_pipe()

    async def send_all_then_close() -> None:
        for size in SIZES:
            await a.send_bytes(bytes(size))
        a.close()

    async with b, anyio.create_task_group() as tg:
        tg.start_soon(send_all_then_close)
        assert [len(await b.recv_bytes()) for _ in SIZES] == SIZES
        with pytest.raises(EOFError):
            await b.recv()
        with pytest.raises(EOFError):  # and again: the end is final
            await b.recv()


async def test_a_waiting_recv_gets_eoferror_when_the_other_end_closes(
    make_pipe: PipeFactory,
) -> None:
    a, b = make_pipe()
    async with b, anyio.create_task_group() as tg:
        tg.start_soon(_close_soon, a)
        with anyio.fail_after(5), pytest.raises(EOFError):
            await b.recv()


async def _close_soon(conn: aioipc.Connection[Any, Any]) -> None:
    await anyio.sleep(0.05)
    conn.close()


async def test_async_for_yields_every_message_then_ends_at_eof(make_pipe: PipeFactory) -> None:
    a, b = make_pipe(duplex=False)
    for i in range(5):
        await b.send(i)
    b.close()
    async with a:
        assert [message async for message in a] == [0, 1, 2, 3, 4]


@pytest.mark.blocks_on_the_loop  # the peer writes half a message with os.write
async def test_a_peer_that_closes_in_the_middle_of_a_message_ends_the_stream(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    os.write(a.fileno(), (1000).to_bytes(4, "big") + b"only part")
    a.close()
    with pytest.raises(EOFError, match="middle of a message"):
        await b.recv()


# -- polling --


async def test_poll_tells_whether_a_message_or_the_end_is_there(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    assert not b.poll()
    await a.send(1)
    assert b.poll()
    assert await b.recv() == 1
    assert not b.poll(0.01)
    a.close()
    assert b.poll()


@pytest.mark.blocks_on_the_loop  # poll(timeout) is the blocking call under test
async def test_poll_with_a_timeout_waits_for_a_message_from_another_thread(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    timer = threading.Timer(0.05, a.sync.send, ("late",))
    timer.start()
    try:
        assert b.poll(5)
    finally:
        timer.join()
    assert await b.recv() == "late"


# -- several receivers, cancellation --


async def test_concurrent_receivers_take_turns_first_come_first_served(
    make_pipe: PipeFactory,
) -> None:
    a, b = make_pipe()
    got: list[tuple[int, int]] = []

    async def receive(i: int) -> None:
        got.append((i, await b.recv()))

    async with a, b, anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(receive, i)
            await anyio.sleep(0.01)
        assert b.statistics().waiting_receivers == 5
        for n in range(5):
            await a.send(n)
    assert sorted(got) == [(i, i) for i in range(5)]  # receiver i got message i


async def test_cancelled_receives_lose_nothing_and_keep_the_order(make_pipe: PipeFactory) -> None:
    a, b = make_pipe()
    rng = random.Random(7)
    payloads = [os.urandom(rng.choice(SIZES[:3])) for _ in range(300)] + [os.urandom(SIZES[3])]
    got: list[bytes] = []
    timeouts = 0

    async def send_in_bursts() -> None:
        for i, payload in enumerate(payloads):
            await a.send_bytes(payload)
            if i % 7 == 0:
                await anyio.sleep(rng.uniform(0, 0.002))

    async with a, b, anyio.create_task_group() as tg:
        with anyio.move_on_after(0.01) as scope:  # nothing is sent yet: this one times out
            await b.recv_bytes()
        timeouts += scope.cancelled_caught
        tg.start_soon(send_in_bursts)
        while len(got) < len(payloads):
            with anyio.move_on_after(rng.uniform(0, 0.002)) as scope:
                got.append(await b.recv_bytes())
            timeouts += scope.cancelled_caught
    assert got == payloads
    assert timeouts > 0  # the test did cancel receives (the first one, and as a rule dozens)


async def test_a_receive_cancelled_in_the_middle_of_a_large_message_leaves_it_whole(
    make_pipe: PipeFactory,
) -> None:
    a, b = make_pipe()
    message = os.urandom(8_000_000)
    async with a, b:
        sync = a.sync
        writer = threading.Thread(target=sync.send_bytes, args=(message,))
        writer.start()
        try:
            with anyio.move_on_after(0.001):
                await b.recv_bytes()
            assert await b.recv_bytes() == message
        finally:
            await anyio.to_thread.run_sync(writer.join)


# -- sending without blocking --


async def test_sends_into_a_full_pipe_wait_without_blocking_the_loop_and_keep_their_order(
    make_pipe: PipeFactory,
) -> None:
    a, b = make_pipe(duplex=False)
    message = b"m" * 1000
    count = 1000  # about 1 MB: much more than the pipe holds
    async with a, b:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def send_all() -> None:
                    for i in range(count):
                        await b.send_bytes(message + i.to_bytes(4, "big"))

                tg.start_soon(send_all)
                await anyio.sleep(0.1)  # the loop runs while the sends wait for room
                assert b.statistics().waiting_senders == 1
                got = [await a.recv_bytes() for _ in range(count)]
    assert [int.from_bytes(m[-4:], "big") for m in got] == list(range(count))


async def test_a_send_cancelled_while_the_pipe_is_full_is_not_sent(make_pipe: PipeFactory) -> None:
    a, b = make_pipe(duplex=False)
    async with a, b:
        sent = await _fill(b)  # its last send was cancelled too
        with anyio.move_on_after(0.05) as scope:  # too large for what is left of the last page
            await b.send("cancelled" * 1000)
        assert scope.cancelled_caught
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.send, "after")
            for _ in range(sent):
                assert await a.recv_bytes() == b"f" * 1000
            assert await a.recv() == "after"


async def _fill(conn: aioipc.Connection[Any, Any]) -> int:
    """Send small messages until the pipe is full; return how many were sent."""
    sent = 0
    while True:
        with anyio.move_on_after(0.05) as scope:
            await conn.send_bytes(b"f" * 1000)
        if scope.cancelled_caught:
            return sent
        sent += 1


async def test_send_bytes_sends_the_buffer_as_it_was_at_the_call(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    buffer = bytearray(b"a" * 1_000_000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.send_bytes, buffer)
        await anyio.sleep(0.05)
        buffer[:] = b"b" * len(buffer)
        assert await b.recv_bytes() == b"a" * 1_000_000


# -- closing --


async def test_use_after_close_raises_closedresourceerror(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, _ = pipe
    a.close()
    a.close()  # idempotent
    assert a.closed
    with pytest.raises(aioipc.ClosedResourceError):
        await a.send(1)
    with pytest.raises(aioipc.ClosedResourceError):
        await a.send_bytes(b"")
    with pytest.raises(aioipc.ClosedResourceError):
        await a.recv()
    with pytest.raises(aioipc.ClosedResourceError):
        await a.recv_bytes()
    with pytest.raises(aioipc.ClosedResourceError):
        a.poll()
    with pytest.raises(aioipc.ClosedResourceError):
        a.fileno()


async def test_close_wakes_every_waiting_receiver_with_closedresourceerror(
    make_pipe: PipeFactory,
) -> None:
    a, b = make_pipe()
    errors: list[BaseException] = []

    async def receive() -> None:
        try:
            await b.recv()
        except aioipc.ClosedResourceError as exc:
            errors.append(exc)

    async with a:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(receive)
                await anyio.sleep(0.05)
                await b.aclose()
    assert len(errors) == 3


@pytest.mark.blocks_on_the_loop  # it joins the closing thread
async def test_close_from_another_thread_wakes_a_waiting_receiver(make_pipe: PipeFactory) -> None:
    a, b = make_pipe()
    timer = threading.Timer(0.05, b.close)
    timer.start()
    try:
        with anyio.fail_after(5), pytest.raises(aioipc.ClosedResourceError):
            await b.recv()
    finally:
        timer.join()
        a.close()


async def test_closing_stops_the_threads_of_this_connection(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    async with anyio.create_task_group() as tg:  # the writer thread sends, the reader thread reads
        tg.start_soon(a.send_bytes, bytes(3_000_000))
        await b.recv_bytes()
    assert a.statistics().threads == 1
    assert b.statistics().threads == 1
    a.close()
    b.close()
    assert a.statistics().threads == b.statistics().threads == 0


def test_an_unclosed_connection_warns() -> None:
    def drop_an_unclosed_end() -> None:
        _unclosed, closed = aioipc.Pipe()
        closed.close()

    with pytest.warns(ResourceWarning, match="unclosed <aioipc.Connection"):
        drop_an_unclosed_end()


# -- the multiprocessing connection underneath --


async def test_wrap_adopts_a_multiprocessing_connection_whose_peer_stays_plain() -> None:
    plain, theirs = multiprocessing.Pipe()
    async with aioipc.Connection.wrap(theirs) as conn:
        plain.send("from a plain peer")
        assert await conn.recv() == "from a plain peer"
        await conn.send_bytes(b"to a plain peer")
        assert plain.recv_bytes() == b"to a plain peer"
        assert conn.sync is theirs
    assert theirs.closed
    plain.close()


def test_wrap_refuses_what_is_not_a_multiprocessing_connection(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    with pytest.raises(TypeError, match="aioipc connection already"):
        aioipc.Connection.wrap(pipe[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"multiprocessing\.connection\.Connection"):
        aioipc.Connection.wrap(object())  # type: ignore[arg-type]


async def test_the_sync_face_stays_blocking_after_the_loop_waited_on_the_connection(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    a, b = pipe
    async with anyio.create_task_group() as tg:
        tg.start_soon(_send_soon, a, "wake")
        assert await b.recv() == "wake"
    assert os.get_blocking(b.fileno())
    a.sync.send("sync")
    assert b.sync.recv() == "sync"


async def _send_soon(conn: aioipc.Connection[Any, Any], message: Any) -> None:
    await anyio.sleep(0.02)
    await conn.send(message)


def test_a_connection_cannot_be_pickled_outside_of_starting_a_process(
    pipe: tuple[aioipc.Connection[Any, Any], aioipc.Connection[Any, Any]],
) -> None:
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(pipe[0])


def test_repr_and_statistics_describe_the_end() -> None:
    receiver, sender = aioipc.Pipe(duplex=False)
    assert repr(receiver).startswith(f"<aioipc.Connection fd={receiver.fileno()} readable at")
    assert repr(sender).startswith(f"<aioipc.Connection fd={sender.fileno()} writable at")
    assert receiver.statistics() == aioipc.ConnectionStatistics(0, 0, 0, 0)
    receiver.close()
    sender.close()
    assert repr(receiver).startswith("<aioipc.Connection closed at")


@pytest.mark.parametrize("method", ["send", "send_bytes"])
async def test_a_send_waiting_for_room_raises_closedresourceerror_when_the_end_is_closed(
    make_pipe: PipeFactory, method: str
) -> None:
    a, b = make_pipe(duplex=False)
    async with a:
        await _fill(b)  # no free page left: a large message must wait for room
        outcome: list[BaseException | None] = []

        async def send() -> None:
            try:
                await getattr(b, method)(b"never sent" * 10_000)
            except aioipc.ClosedResourceError as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                while b.statistics().waiting_senders == 0:
                    await anyio.sleep(0.01)
                b.close()
        assert len(outcome) == 1
        assert isinstance(outcome[0], aioipc.ClosedResourceError)


# -- arguments --


@pytest.mark.parametrize("duplex", ["x", 1, None])
def test_pipe_duplex_must_be_a_bool(duplex: Any) -> None:
    with pytest.raises(TypeError, match=rf"duplex must be a bool, not .*{duplex!r}"):
        aioipc.Pipe(duplex=duplex)


def test_pipe_ctx_must_be_a_multiprocessing_context() -> None:
    with pytest.raises(TypeError, match=r"ctx must be a multiprocessing context.* str 'spawn'"):
        aioipc.Pipe(ctx="spawn")  # type: ignore[arg-type]


def test_pipe_takes_any_multiprocessing_context() -> None:
    for method in multiprocessing.get_all_start_methods():
        a, b = aioipc.Pipe(ctx=multiprocessing.get_context(method))
        a.close()
        b.close()


@pytest.mark.parametrize("size", [10, 1 << 20], ids=["small", "large"])
async def test_a_send_to_a_closed_peer_raises_broken_resource_error(size: int) -> None:
    here, there = aioipc.Pipe()
    there.close()
    with pytest.raises(aioipc.BrokenResourceError, match="other end of the connection is gone"):
        await here.send_bytes(b"x" * size)
    here.close()


async def test_receiving_on_a_second_event_loop_while_the_first_receives_raises_busy() -> None:
    # The loop's readiness path (the default on Linux) watches the fd for one loop at a time.
    a, b = aioipc.Pipe()
    refused: list[str] = []

    async def receive_on_another_loop() -> None:
        try:
            await b.recv()
        except aioipc.BusyResourceError as exc:
            refused.append(str(exc))

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.recv)
                while b.statistics().waiting_receivers == 0:
                    await anyio.sleep(0.005)
                await anyio.to_thread.run_sync(anyio.run, receive_on_another_loop)
                await a.send("for the first receiver")
    finally:
        a.close()
        b.close()
    assert len(refused) == 1
    assert "another thread's event loop" in refused[0]
