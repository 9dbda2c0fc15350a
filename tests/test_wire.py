"""The wire: frames parsed the same whatever the chunks they arrive in, and read exactly."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

import aioipc
from aioipc import _wire

payloads = st.lists(st.binary(max_size=3000), min_size=1, max_size=12)


def stream_of(items: list[bytes]) -> bytes:
    return b"".join(_wire.header(len(item)) + item for item in items)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` in chunks cut at ``points`` (positions anywhere, headers included)."""
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@contextmanager
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


@settings(max_examples=150, deadline=None)
@given(items=payloads, points=st.lists(st.integers(min_value=0), max_size=30))
def test_the_parser_returns_the_frames_whatever_the_chunk_boundaries(
    items: list[bytes], points: list[int]
) -> None:
    with pipe() as (r, w):
        wire = _wire.Wire(r, thread_owned=False)
        got: list[bytes] = []
        for chunk in cut(stream_of(items), points):
            os.write(w, chunk)
            while wire.ingest(_wire.READ_CHUNK, wait=False):
                pass
            while wire.frames:
                got.append(wire.frames.popleft())
            assert wire.end is None
        assert got == items
        assert not wire.in_message


@settings(max_examples=100, deadline=None)
@given(items=payloads, limit=st.integers(min_value=1, max_value=64))
def test_the_parser_returns_the_frames_whatever_the_read_size(
    items: list[bytes], limit: int
) -> None:
    with pipe() as (r, w):
        os.write(w, stream_of(items))
        wire = _wire.Wire(r, thread_owned=False)
        while wire.ingest(limit, wait=False):
            pass
        assert list(wire.frames) == items


@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.integers() | st.text(max_size=50), min_size=1, max_size=20))
def test_a_queue_reads_exactly_one_item_per_take_and_never_a_byte_more(items: list[object]) -> None:
    queue = aioipc.Queue[object]()
    try:
        sync = queue.sync
        for item in items:
            sync.put(item)
        for i, item in enumerate(items):
            # What is left in the pipe is exactly the frames of the items not taken yet.
            left = sum(len(_wire.dumps(x)) + 4 for x in items[i:])
            assert _wire.available(sync._fd) == left  # type: ignore[attr-defined]
            assert sync.get_nowait() == item
        assert _wire.available(sync._fd) == 0  # type: ignore[attr-defined]
    finally:
        queue.close()


def test_a_long_header_is_written_for_bodies_over_two_gib() -> None:
    assert _wire.header(10) == (10).to_bytes(4, "big")
    assert _wire.header(2**31) == (-1).to_bytes(4, "big", signed=True) + (2**31).to_bytes(8, "big")
