"""Chaos: producer and consumer processes paused and killed at random, on every event loop.

Not part of the default run (``pyproject.toml`` ignores this folder); run it with
``nox -s chaos`` or ``python -m pytest tests/chaos``. It prints its seed: ``CHAOS_SEED=N`` replays
the same choices (the timing, and so the exact outcome, still varies). ``CHAOS_ROUNDS`` sets the
rounds per event loop.

Each round: a bounded queue; 4 producer processes linked to it (2 putting from the event loop
under test, 2 through the blocking ``q.sync.put``), each putting ``ITEMS`` numbered items, some
larger than the pipe (so that a kill or a pause can land in the middle of one); 4 consumer
processes (2 async, 2 blocking) taking until the queue ends. Meanwhile the test SIGSTOPs and
SIGCONTs producers and consumers at random, and SIGKILLs up to 2 producers and 2 consumers.

The verdict does not depend on the timing (no count of random events is asserted):

- no item is received twice, and each consumer receives each producer's items in order;
- every item whose ``put`` returned arrives, except at most one per killed consumer (the item it
  held), and items whose loss is reported: the surviving consumers end with
  :class:`aioipc.BrokenResourceError` naming the killed producer (the items its feeder thread had
  not written) or the killed process that cut the stream;
- every process that was not killed ends with the queue's end: ``ShutDown`` if no producer was
  killed, else ``BrokenResourceError`` naming only killed processes (a producer's ``put`` too);
- no ``put`` or ``get`` waits longer than ``BOUND`` seconds.

One failure is known and documented (docs/failures.md, "A known gap"): a process killed in the
instant between taking one of the queue's locks and recording itself as its holder leaves the lock
taken with no holder recorded, and the queue wedges. A round that ends so (a lock still taken and
no holder recorded for it, with every process gone) is reported with its seed and makes the test
an expected failure, not a pass; any other problem, in any round, fails it.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import RawArray
from typing import Any

import anyio
import pytest

import aioipc

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(600)]

FORK = multiprocessing.get_context("fork")

SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
ROUNDS = int(os.environ.get("CHAOS_ROUNDS") or 5)

PRODUCERS = CONSUMERS = 4
ITEMS = 2000
#: Every LARGE_EVERY-th item carries LARGE bytes: more than the pipe holds (1 MiB).
LARGE_EVERY, LARGE = 97, 3 << 19
MAXSIZE = 64
#: No put or get may wait longer than this (pauses last 0.3 s at most).
BOUND = 10.0
#: How long the test goes on pausing and killing in a round (then it lets the round finish).
CHAOS_SECONDS = 4.0
MSG = 512

# Outcomes, as each process records it.
RUNNING, ENDED, BROKEN, TOO_LONG, OTHER = 0, 1, 2, 3, 4
NAMES = {RUNNING: "nothing", ENDED: "ended", BROKEN: "broken", TOO_LONG: "waited too long"}


class Shared:
    """What the processes of a round record, in shared memory (it survives a SIGKILL)."""

    def __init__(self) -> None:
        n = PRODUCERS + CONSUMERS
        #: Per producer: how many of its puts returned.
        self.acked = RawArray("q", PRODUCERS)
        #: Per consumer, per producer, per item: how many times the consumer received it.
        self.received = RawArray("B", CONSUMERS * PRODUCERS * ITEMS)
        #: Per consumer: items received out of their producer's order.
        self.disorder = RawArray("q", CONSUMERS)
        #: Per process (producers, then consumers): its longest put or get, in microseconds.
        self.longest = RawArray("q", n)
        self.outcome = RawArray("q", n)
        self.message = RawArray("c", n * MSG)

    def end(self, who: int, outcome: int, message: str) -> None:
        self.message[who * MSG : (who + 1) * MSG] = message.encode()[:MSG].ljust(MSG, b"\0")
        self.outcome[who] = outcome

    def message_of(self, who: int) -> str:
        return bytes(self.message[who * MSG : (who + 1) * MSG]).rstrip(b"\0").decode()


def run_on(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        import uvloop

        anyio.run(main, backend="asyncio", backend_options={"loop_factory": uvloop.new_event_loop})
    else:
        anyio.run(main, backend=loop)


def item(p: int, seq: int) -> tuple[int, int, bytes]:
    return (p, seq, b"x" * LARGE if seq % LARGE_EVERY == LARGE_EVERY - 1 else b"")


# -- the processes --


def produce(loop: str, face: str, q: aioipc.Queue[Any], p: int, shared: Shared) -> None:
    longest = 0.0

    def done(started: float, seq: int) -> None:
        nonlocal longest
        shared.acked[p] = seq + 1
        waited = time.monotonic() - started
        if waited > longest:
            longest = waited
            shared.longest[p] = int(waited * 1e6)

    async def put_async() -> None:
        for seq in range(ITEMS):
            started = time.monotonic()
            with anyio.fail_after(BOUND):
                await q.put(item(p, seq))
            done(started, seq)

    try:
        if face == "async":
            run_on(loop, put_async)
        else:
            for seq in range(ITEMS):
                started = time.monotonic()
                q.sync.put(item(p, seq), timeout=BOUND)
                done(started, seq)
    except aioipc.BrokenResourceError as exc:
        shared.end(p, BROKEN, str(exc))
    except (TimeoutError, aioipc.Full):
        shared.end(p, TOO_LONG, f"a put waited longer than {BOUND} s")
    except Exception as exc:
        shared.end(p, OTHER, f"{type(exc).__name__}: {exc}")
    else:
        shared.end(p, ENDED, "")


def consume(loop: str, face: str, q: aioipc.Queue[Any], c: int, shared: Shared) -> None:
    who = PRODUCERS + c
    last = [-1] * PRODUCERS
    longest = 0.0
    base = c * PRODUCERS * ITEMS

    def record(started: float, got: tuple[int, int, bytes]) -> None:
        nonlocal longest
        p, seq, _ = got
        shared.received[base + p * ITEMS + seq] = min(
            shared.received[base + p * ITEMS + seq] + 1, 255
        )
        if seq <= last[p]:
            shared.disorder[c] += 1
        last[p] = seq
        waited = time.monotonic() - started
        if waited > longest:
            longest = waited
            shared.longest[who] = int(waited * 1e6)

    async def get_async() -> None:
        while True:
            started = time.monotonic()
            with anyio.fail_after(BOUND):
                got = await q.get()
            record(started, got)

    try:
        if face == "async":
            run_on(loop, get_async)
        else:
            while True:
                started = time.monotonic()
                record(started, q.sync.get(timeout=BOUND))
    except aioipc.ShutDown:
        shared.end(who, ENDED, "")
    except aioipc.BrokenResourceError as exc:
        shared.end(who, BROKEN, str(exc))
    except (TimeoutError, aioipc.Empty):
        shared.end(who, TOO_LONG, f"a get waited longer than {BOUND} s")
    except Exception as exc:
        shared.end(who, OTHER, f"{type(exc).__name__}: {exc}")


# -- the round --


@dataclass
class Figures:
    rounds: int = 0
    killed_producers: int = 0
    killed_consumers: int = 0
    paused: int = 0
    put: int = 0
    received: int = 0
    reported_lost: int = 0
    held_by_killed_consumers: int = 0
    cut: int = 0
    longest_wait: float = 0.0
    problems: list[str] = field(default_factory=list)
    #: The rounds that ended in the known gap, with their problems.
    gaps: list[str] = field(default_factory=list)

    def add(self, other: Figures) -> None:
        for name in (
            "rounds",
            "killed_producers",
            "killed_consumers",
            "paused",
            "put",
            "received",
            "reported_lost",
            "held_by_killed_consumers",
            "cut",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.longest_wait = max(self.longest_wait, other.longest_wait)
        self.problems += other.problems
        self.gaps += other.gaps

    def __str__(self) -> str:
        return (
            f"{self.rounds} rounds: killed {self.killed_producers} producers and "
            f"{self.killed_consumers} consumers, paused {self.paused} times; items put "
            f"(acknowledged) {self.put}, received {self.received}, lost and reported "
            f"{self.reported_lost} ({self.cut} cut streams), held by killed consumers "
            f"{self.held_by_killed_consumers}; longest put or get {self.longest_wait:.2f} s"
        )


async def run_round(loop: str, rng: random.Random) -> Figures:
    q: aioipc.Queue[Any] = aioipc.Queue(MAXSIZE, ctx=FORK)
    shared = Shared()
    faces = ["async", "sync"] * 2
    producers = [
        aioipc.Process(
            target=produce, args=(loop, faces[p], q, p, shared), ctx=FORK, name=f"producer-{p}"
        )
        for p in range(PRODUCERS)
    ]
    consumers = [
        aioipc.Process(
            target=consume, args=(loop, faces[c], q, c, shared), ctx=FORK, name=f"consumer-{c}"
        )
        for c in range(CONSUMERS)
    ]
    everyone = producers + consumers
    figures = Figures(rounds=1)
    killed: set[int] = set()  # indices into everyone

    def signal_to(i: int, sig: int) -> None:
        pid = everyone[i].pid
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    try:
        for process in consumers + producers:
            process.start()
        q.link(*producers)
        # When to kill whom: up to 2 producers and 2 consumers, at random moments.
        kills = [(rng.uniform(0, CHAOS_SECONDS / 2), "p") for _ in range(rng.randint(0, 2))]
        kills += [(rng.uniform(0, CHAOS_SECONDS / 2), "c") for _ in range(rng.randint(0, 2))]
        kills.sort()
        paused: dict[int, float] = {}  # index -> when to resume it
        started = time.monotonic()
        while any(p.exitcode is None for p in producers):
            now = time.monotonic() - started
            if now > CHAOS_SECONDS:
                break
            for i, until in list(paused.items()):
                if now >= until:
                    signal_to(i, signal.SIGCONT)
                    del paused[i]
            while kills and kills[0][0] <= now:
                _, kind = kills.pop(0)
                group = range(PRODUCERS) if kind == "p" else range(PRODUCERS, len(everyone))
                alive = [i for i in group if i not in killed and everyone[i].exitcode is None]
                if alive:
                    victim = rng.choice(alive)
                    signal_to(victim, signal.SIGKILL)
                    killed.add(victim)
                    paused.pop(victim, None)
            if rng.random() < 0.5:
                candidates = [
                    i
                    for i in range(len(everyone))
                    if i not in killed and i not in paused and everyone[i].exitcode is None
                ]
                if candidates:
                    i = rng.choice(candidates)
                    signal_to(i, signal.SIGSTOP)
                    paused[i] = now + rng.uniform(0.02, 0.3)
                    figures.paused += 1
            await anyio.sleep(rng.uniform(0.005, 0.03))
        for i in paused:
            signal_to(i, signal.SIGCONT)
        with anyio.move_on_after(3 * BOUND + 30):
            for process in everyone:
                await process.wait()
        hung = [process.name for process in everyone if process.exitcode is None]
        if hung:
            figures.problems.append(f"still running {3 * BOUND + 30} s later: {hung}")
    finally:
        for i, process in enumerate(everyone):
            if process.pid is not None and process.exitcode is None:
                signal_to(i, signal.SIGCONT)
                process.kill()
                await process.wait()
        left_taken, unrecorded = locks_left_taken(q)
        figures.problems += left_taken
        q.sync.cancel_join_thread()  # a wedged lock must not hold up this process's exit
        q.close()

    # -- the verdict --
    problems = figures.problems
    # A victim that had finished as the signal came exited with 0: it was not killed.
    killed = {i for i in killed if everyone[i].exitcode != 0}
    killed_pids = {everyone[i].pid for i in killed}
    figures.killed_producers = sum(1 for i in killed if i < PRODUCERS)
    figures.killed_consumers = sum(1 for i in killed if i >= PRODUCERS)
    for i, process in enumerate(everyone):
        expected = -signal.SIGKILL if i in killed else 0
        if process.exitcode != expected:
            problems.append(f"{process.name} exited with {process.exitcode}")
    reported: set[int] = set()
    for i, process in enumerate(everyone):
        if i in killed:
            continue
        outcome, message = shared.outcome[i], shared.message_of(i)
        figures.longest_wait = max(figures.longest_wait, shared.longest[i] / 1e6)
        if outcome == BROKEN:
            named = {int(pid) for pid in re.findall(r"pid (\d+)", message)}
            if not named or not named <= killed_pids:
                problems.append(
                    f"{process.name}: BrokenResourceError naming no killed pid: {message}"
                )
            if i >= PRODUCERS:
                reported |= named
                if "cut" in message:
                    reported.add(-1)
        elif outcome == ENDED:
            if i >= PRODUCERS and figures.killed_producers:
                problems.append(f"{process.name} ended cleanly although a producer was killed")
        else:
            problems.append(f"{process.name}: {NAMES.get(outcome, 'error')} {message}")
    received = [[0] * ITEMS for _ in range(PRODUCERS)]
    for c in range(CONSUMERS):
        if shared.disorder[c]:
            problems.append(f"consumer-{c} received {shared.disorder[c]} items out of order")
        base = c * PRODUCERS * ITEMS
        for p in range(PRODUCERS):
            row = received[p]
            for seq, n in enumerate(shared.received[base + p * ITEMS : base + (p + 1) * ITEMS]):
                row[seq] += n
    unexplained = 0
    for p in range(PRODUCERS):
        duplicates = [seq for seq, n in enumerate(received[p]) if n > 1]
        if duplicates:
            problems.append(f"producer-{p}: items received twice: {duplicates[:10]}")
        missing = sum(1 for seq in range(shared.acked[p]) if not received[p][seq])
        figures.put += shared.acked[p]
        figures.received += sum(1 for n in received[p] if n)
        if -1 in reported or everyone[p].pid in reported:
            figures.reported_lost += missing
        else:
            unexplained += missing
    figures.cut = int(-1 in reported)
    figures.held_by_killed_consumers = unexplained
    if unexplained > figures.killed_consumers:
        problems.append(
            f"{unexplained} acknowledged items lost without a report "
            f"(at most {figures.killed_consumers}: one per killed consumer)"
        )
    if figures.longest_wait > BOUND:
        problems.append(f"a put or get waited {figures.longest_wait:.1f} s")
    if unrecorded:  # the known gap: what follows from the wedged lock is reported, not failed
        figures.gaps = [f"a lock left taken with no holder recorded: {'; '.join(problems)}"]
        figures.problems = []
    return figures


#: Where the queue's shared state block records the holder of its read, write and state locks.
HOLDER_SLOTS = {"read": 3, "write": 5, "state": 9}


def locks_left_taken(q: aioipc.Queue[Any]) -> tuple[list[str], bool]:
    """Every process of the round is gone: each of the queue's locks must be free, or held by a
    dead process between two items (given back here). One still taken would wedge the queue.
    Also says whether one is taken with no holder recorded (the known gap)."""
    sync: Any = q.sync
    if not sync.recover():
        return [], False  # a cut stream: reported to every process, nothing to wait for
    problems = []
    unrecorded = False
    state = list(sync._state)
    for name, lock in (("read", sync._rlock), ("write", sync._wlock), ("state", sync._slock)):
        if lock.acquire(False):
            lock.release()
        else:
            problems.append(f"the {name} lock is left taken; shared state {state}")
            unrecorded |= state[HOLDER_SLOTS[name]] == 0
    return problems, unrecorded


def loop_of(anyio_backend: Any) -> str:
    name, options = anyio_backend
    if name == "trio":
        return "trio"
    return "uvloop" if "loop_factory" in options else "asyncio"


async def test_no_acknowledged_item_is_lost_silently_and_no_process_wedges(
    anyio_backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = loop_of(anyio_backend)
    with capsys.disabled():
        print(f"\nchaos on {loop}: CHAOS_SEED={SEED} CHAOS_ROUNDS={ROUNDS}", flush=True)
    total = Figures()
    for r in range(ROUNDS):
        figures = await run_round(loop, random.Random(f"{SEED}-{loop}-{r}"))
        total.add(figures)
        with capsys.disabled():
            print(f"  round {r}: {figures}", flush=True)
            for problem in figures.problems:
                print(f"    PROBLEM: {problem}", flush=True)
            for gap in figures.gaps:
                print(f"    KNOWN GAP: {gap}", flush=True)
    with capsys.disabled():
        print(f"chaos on {loop}, all: {total}", flush=True)
    assert not total.problems, f"CHAOS_SEED={SEED}: " + "; ".join(total.problems)
    if total.gaps:
        pytest.xfail(
            f"CHAOS_SEED={SEED}: the known gap of docs/failures.md: " + " | ".join(total.gaps)
        )
