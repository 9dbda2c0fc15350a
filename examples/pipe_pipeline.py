"""A pipeline of processes joined by pipes: numbers, then their squares, then the event loop.

One process sends 0..9 into a pipe; a second process squares each number and sends it on through
a second pipe; the main coroutine prints what comes out until the end of file, then ``End``.

EOF reaches a receiving end only once every copy of the sending end is closed, in every process.
A child holds copies of the ends it is given and, under the fork start method, of every end the
parent had when it started: so each child closes the ends it does not use, and the parent closes
its copies of the children's ends once they run.

    python examples/pipe_pipeline.py [--start-method fork|forkserver|spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
from collections.abc import Iterable
from multiprocessing.context import BaseContext

import aioipc

Ends = Iterable[aioipc.Connection[int, int]]


def create_items(numbers: aioipc.Connection[int, int], unused: Ends) -> None:
    """The first process (synchronous code: it uses the connection's blocking face).

    ``unused`` are the ends it was given only to close them: under fork it holds copies of them.
    """
    for end in unused:
        end.close()
    try:
        for item in range(10):
            numbers.sync.send(item)
    finally:
        numbers.close()  # with the other copies closed, this is what lets EOF reach the squarer


def multiply_items(
    numbers: aioipc.Connection[int, int], squares: aioipc.Connection[int, int], unused: Ends
) -> None:
    """The second process, asynchronous: it runs its own event loop. It closes ``unused``
    first, as the first process does."""
    for end in unused:
        end.close()
    asyncio.run(square_all(numbers, squares))


async def square_all(
    numbers: aioipc.Connection[int, int], squares: aioipc.Connection[int, int]
) -> None:
    """Square what comes in until EOF, then close both ends (EOF for the main process)."""
    async with numbers, squares:
        async for item in numbers:
            await squares.send(item * item)


async def run(ctx: BaseContext) -> None:
    """The main coroutine: build the pipes, start both processes, print the squares."""
    # Pipe(duplex=False) returns (receiving end, sending end), as multiprocessing.Pipe does.
    numbers_in, numbers_out = aioipc.Pipe(duplex=False, ctx=ctx)
    squares_in, squares_out = aioipc.Pipe(duplex=False, ctx=ctx)
    async with (
        numbers_in,
        numbers_out,
        squares_in,
        squares_out,
        aioipc.open_process(
            create_items, numbers_out, [numbers_in, squares_in, squares_out], ctx=ctx
        ),
        aioipc.open_process(
            multiply_items, numbers_in, squares_out, [numbers_out, squares_in], ctx=ctx
        ),
    ):
        # This process only reads the squares: it closes its copies of the children's ends.
        for end in (numbers_out, numbers_in, squares_out):
            end.close()
        async for square in squares_in:
            print(square, flush=True)
        print("End", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-method", choices=multiprocessing.get_all_start_methods())
    args = parser.parse_args()
    asyncio.run(run(multiprocessing.get_context(args.start_method)))


if __name__ == "__main__":
    main()
