"""The cases, and how they run: groups of variants measured alternately, summarised as medians.

A :class:`Group` holds the variants that are compared with each other (one case, one payload). Each
round measures every variant of the group once, in an order that rotates from round to round, so
that drift on a busy machine hits all of them alike. A ratio is taken within each round (a variant
against the group's baseline measured moments before or after it), and the figure reported is the
median over the rounds.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from . import _measure as m
from ._measure import Sample

PAYLOADS = ("small int", "1 KiB", "64 KiB", "1 MiB")
LOOPS = ("asyncio", "uvloop", "trio")

#: Sync throughput to expect per payload (items/s), to size the first measurement of a group.
GUESSED_RATE = {"small int": 60_000, "1 KiB": 40_000, "64 KiB": 5_000, "1 MiB": 400}


@dataclass(frozen=True)
class Target:
    """A figure to reach: the ``ratio`` to the baseline, or the ``value``, against ``bound``."""

    on: Literal["ratio", "value"]
    op: Literal[">=", "<=", "<"]
    bound: float
    unit: str = "x"

    def met(self, figure: float) -> bool:
        if self.op == ">=":
            return figure >= self.bound
        if self.op == "<=":
            return figure <= self.bound
        return figure < self.bound

    def __str__(self) -> str:
        bound = f"{self.bound:.2f}" if self.unit == "x" else f"{self.bound:g}"
        return f"{self.op} {bound}{'x' if self.unit == 'x' else ' ' + self.unit}"


@dataclass(frozen=True)
class Variant:
    """One way of doing the group's work. ``measure(n)`` does ``n`` units of it."""

    key: str
    name: str
    measure: Callable[[int], Sample]
    #: Expected speed relative to the baseline, to size this variant's first measurement.
    expect: float = 1.0
    target: Target | None = None


@dataclass(frozen=True)
class Comparison:
    """A row derived from two variants of a group, round by round: ``a / b`` or ``a - b``."""

    name: str
    a: str
    b: str
    how: Literal["ratio", "difference"]
    target: Target | None
    #: Compare the samples' values, or one of their extras.
    metric: str = "value"
    unit: str = "x"


@dataclass
class Group:
    """Variants compared with each other; ``variants[0]`` is the baseline when ``baseline``."""

    section: str
    label: str
    unit: str
    variants: list[Variant]
    first_n: int
    baseline: bool = True
    adaptive: bool = True
    min_n: int = 20
    comparisons: list[Comparison] = field(default_factory=list)
    #: Why the group is not run (shown in place of figures).
    skip: str | None = None


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    section: str
    label: str
    variant: str
    unit: str
    value: float | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    #: Aimed duration of one measurement.
    seconds: float = 0.35
    #: Whether glibc's malloc thresholds were fixed (see ``_measure.steady_allocator``).
    steady_malloc: bool = False


# -- running ----------------------------------------------------------------------------------


def run_group(group: Group, settings: Settings) -> list[Row]:
    """Measure the group's variants alternately for ``settings.rounds`` rounds; summarise."""
    if group.skip is not None:
        return [Row(group.section, group.label, "", group.unit, note=group.skip)]
    samples: dict[str, list[Sample]] = {v.key: [] for v in group.variants}
    sizes: dict[str, int] = {}
    error = ""
    for round_no in range(settings.rounds):
        shift = round_no % len(group.variants)
        for variant in group.variants[shift:] + group.variants[:shift]:
            n = sizes.get(variant.key) or _first_size(group, variant, samples, settings)
            try:
                sample = variant.measure(n)
            except Exception as exc:
                error = f"error in {variant.name}: {type(exc).__name__}: {exc}"
                break
            samples[variant.key].append(sample)
            if group.adaptive:
                sizes[variant.key] = _next_size(group, sample, settings)
        if error:
            break
    if error:
        return [Row(group.section, group.label, "", group.unit, note=error)]
    return _summarise(group, samples)


def _first_size(
    group: Group, variant: Variant, samples: dict[str, list[Sample]], settings: Settings
) -> int:
    if not group.adaptive:
        return group.first_n
    base = samples[group.variants[0].key]
    if group.baseline and base:
        rate = base[0].items / base[0].seconds
        return max(group.min_n, round(rate * settings.seconds * variant.expect))
    return max(group.min_n, round(group.first_n * variant.expect * settings.seconds))


def _next_size(group: Group, sample: Sample, settings: Settings) -> int:
    rate = sample.items / max(sample.seconds, 1e-6)
    return max(group.min_n, min(round(rate * settings.seconds), 5_000_000))


def _summarise(group: Group, samples: dict[str, list[Sample]]) -> list[Row]:
    rows = []
    base = samples[group.variants[0].key] if group.baseline else None
    for variant in group.variants:
        mine = samples[variant.key]
        values = [s.value for s in mine]
        row = Row(group.section, group.label, variant.name, group.unit, statistics.median(values))
        row.values = values
        row.extra = {key: statistics.median(s.extra[key] for s in mine) for key in mine[0].extra}
        row.note = ", ".join(
            f"{k[:-3]} {v:.0f} us" for k, v in row.extra.items() if k[-3:] == "_us"
        )
        if base is not None:
            row.ratios = [s.value / b.value for s, b in zip(mine, base, strict=True)]
            row.ratio = statistics.median(row.ratios)
        if variant.target is not None:
            figure = row.ratio if variant.target.on == "ratio" else row.value
            assert figure is not None
            row.target, row.met = str(variant.target), variant.target.met(figure)
        rows.append(row)
    for comp in group.comparisons:
        pairs = zip(samples[comp.a], samples[comp.b], strict=True)
        per_round = [_compare(comp, a, b) for a, b in pairs]
        row = Row(group.section, group.label, comp.name, comp.unit, statistics.median(per_round))
        row.values = per_round
        if comp.target is not None:
            assert row.value is not None
            row.target, row.met = str(comp.target), comp.target.met(row.value)
        rows.append(row)
    return rows


def _compare(comp: Comparison, a: Sample, b: Sample) -> float:
    x = a.value if comp.metric == "value" else a.extra[comp.metric]
    y = b.value if comp.metric == "value" else b.extra[comp.metric]
    return x / y if comp.how == "ratio" else x - y


def run(groups: Iterable[Group], settings: Settings) -> list[Row]:
    """Run every group, reporting progress on stderr."""
    groups = list(groups)
    rows: list[Row] = []
    started = time.monotonic()
    for i, group in enumerate(groups, 1):
        elapsed = time.monotonic() - started
        print(
            f"[{i:3}/{len(groups)} {elapsed:5.0f} s] {group.section}: {group.label}",
            file=sys.stderr,
            flush=True,
        )
        rows += run_group(group, settings)
    return rows


# -- the cases --------------------------------------------------------------------------------

AT_LEAST_90 = Target("ratio", ">=", 0.90)
AT_MOST_1_3 = Target("ratio", "<=", 1.3)
AT_MOST_1_2 = Target("ratio", "<=", 1.2)


def _queue_names(verb: str) -> dict[str, str]:
    obj, call = ("q", "get") if verb == "get" else ("conn", "recv")
    return {
        "sync": f"sync {obj}.sync.{call}() loop (the limit)",
        "asyncio": f"await {obj}.{call}(), asyncio",
        "uvloop": f"await {obj}.{call}(), uvloop",
        "trio": f"await {obj}.{call}(), trio",
        "to_thread": f"asyncio.to_thread({obj}.sync.{call})",
        "aioprocessing": f"aioprocessing await coro_{call}()",
        "mp": "multiprocessing.Queue get() loop",
    }


def throughput_groups(kind: str) -> list[Group]:
    """One producer child -> a consumer in this process, every payload, loops and peers."""
    verb = "get" if kind == "queue" else "recv"
    names = _queue_names(verb)
    channel = "aioipc.Queue" if kind == "queue" else "aioipc.Pipe(duplex=False)"
    section = f"Throughput, 1 producer process -> consumer here, {channel}"
    keys = ["sync", *LOOPS, "to_thread", "aioprocessing"] + (["mp"] if kind == "queue" else [])
    groups = []
    for payload in PAYLOADS:
        variants = [
            Variant(
                key,
                names[key],
                partial(m.throughput, kind, key, payload),
                expect=0.1 if key in ("to_thread", "aioprocessing") else 1.0,
                # The target is the standard library's loop: for a pipe that is the sync face
                # (multiprocessing's own Connection); for a queue, the rows against
                # multiprocessing.Queue below (q.sync is aioipc's own queue, faster than it).
                target=AT_LEAST_90 if key in LOOPS and kind == "pipe" else None,
            )
            for key in keys
        ]
        versus = [
            Comparison(
                f"await {verb}() asyncio / aioprocessing",
                "asyncio",
                "aioprocessing",
                "ratio",
                Target("value", ">=", 15) if payload == "small int" else None,
            )
        ]
        if kind == "queue":  # against the standard library's own queue, default settings
            versus += [
                Comparison(
                    f"await get() {loop} / multiprocessing.Queue",
                    loop,
                    "mp",
                    "ratio",
                    Target("value", ">=", 0.9),
                )
                for loop in LOOPS
            ]
        skip = None if kind == "queue" or m.pipe_available() else "n/a (not built)"
        groups.append(
            Group(
                section,
                payload,
                "items/s",
                variants,
                GUESSED_RATE[payload],
                comparisons=versus,
                skip=skip,
            )
        )
    return groups


def fan_groups(producers: int, consumers: int) -> list[Group]:
    """Several producer processes, one or several consumer processes, on each loop."""
    names = _queue_names("get")
    where = "consumer here" if consumers == 1 else f"{consumers} consumer processes"
    section = f"Throughput, {producers} producer processes -> {where}, aioipc.Queue"
    return [
        Group(
            section,
            payload,
            "items/s",
            [
                Variant(
                    key,
                    names[key],
                    partial(
                        m.throughput,
                        "queue",
                        key,
                        payload,
                        producers=producers,
                        consumers=consumers,
                    ),
                )
                for key in ("sync", *LOOPS)
            ],
            GUESSED_RATE[payload],
        )
        for payload in PAYLOADS
    ]


def async_producer_groups() -> list[Group]:
    """A producer in this process -> a synchronous consumer child, unbounded and bounded."""
    groups = []
    for maxsize in (0, 100):
        label = "small int, " + ("unbounded" if not maxsize else f"maxsize={maxsize}")
        variants = [
            Variant(
                key,
                "sync q.sync.put() loop" if key == "sync" else f"await q.put(), {key}",
                partial(m.async_producer, key, maxsize, "small int"),
                target=AT_LEAST_90 if key in LOOPS else None,
            )
            for key in ("sync", *LOOPS)
        ]
        section = "Async producer here -> sync consumer process, aioipc.Queue"
        groups.append(Group(section, label, "items/s", variants, GUESSED_RATE["small int"]))
    return groups


def round_trip_groups() -> list[Group]:
    """Ping-pong of a small int with an echoing child, over a Pipe and over a pair of queues."""
    groups = []
    for kind in ("pipe", "queue"):
        put, get = ("put", "get") if kind == "queue" else ("send", "recv")
        obj = "q" if kind == "queue" else "conn"
        names = {
            "sync": f"sync {put}() + {get}() (the limit)",
            "asyncio": f"await {put}() + await {get}(), asyncio",
            "uvloop": f"await {put}() + await {get}(), uvloop",
            "trio": f"await {put}() + await {get}(), trio",
            "to_thread": f"{put}() + asyncio.to_thread({obj}.sync.{get})",
            "aioprocessing": f"aioprocessing coro_{put}() + coro_{get}()",
        }
        if kind == "queue":
            names["mp"] = "multiprocessing.Queue put() + get()"
        variants = [
            Variant(
                key,
                names[key],
                partial(m.round_trip, kind, key),
                expect=0.3 if key in ("to_thread", "aioprocessing") else 0.8,
                target=AT_MOST_1_3 if key in LOOPS else None,
            )
            for key in names
        ]
        label = "Pipe(duplex=True)" if kind == "pipe" else "pair of Queues"
        skip = None if kind == "queue" or m.pipe_available() else "n/a (not built)"
        groups.append(
            Group(
                "Round trip, this process <-> echo process, small int",
                label,
                "us",
                variants,
                20_000,
                min_n=200,
                skip=skip,
            )
        )
    return groups


def work_sharing_groups(workers: int = 4, job_seconds: float = 0.02, n: int = 100) -> list[Group]:
    """Consumer processes sharing slow jobs queued at once: makespan against blocking
    ``multiprocessing.Queue`` consumers, and how many jobs each worker took."""
    work = partial(m.work_sharing, workers=workers, job_seconds=job_seconds)
    variants = [
        Variant("mp", "blocking multiprocessing.Queue get() (the limit)", partial(work, "mp", 0)),
        Variant("sync", "blocking q.sync.get()", partial(work, "sync", 0), target=AT_MOST_1_2),
        *(
            Variant(loop, f"await q.get(), {loop}", partial(work, loop, 0), target=AT_MOST_1_2)
            for loop in LOOPS
        ),
        Variant("prefetch", "await q.get(), asyncio, prefetch=16", partial(work, "asyncio", 16)),
    ]
    section = (
        f"Work sharing: {workers} consumer processes, {n} jobs of {job_seconds * 1000:.0f} ms "
        "queued at once (makespan)"
    )
    return [Group(section, "makespan", "s", variants, n, adaptive=False)]


def prefetch_groups(prefetch: int = 64) -> list[Group]:
    """What ``prefetch`` buys: a consumer whose gets go through the reader thread, here those of
    a manager's queue proxy (a round trip each)."""
    variants = [
        Variant("0", "await q.get(), asyncio, prefetch=0 (the default)", partial(m.proxy_drain, 0)),
        Variant(
            str(prefetch),
            f"await q.get(), asyncio, prefetch={prefetch}",
            partial(m.proxy_drain, prefetch),
            expect=3.0,
        ),
    ]
    section = "Prefetch: a manager's queue proxy drained through Queue.wrap() (items/s)"
    return [Group(section, "small int", "items/s", variants, 5_000)]


def pending_groups(n: int = 10_000) -> list[Group]:
    """Threads and memory of ``n`` parked ``get()`` calls, against an in-process queue."""
    groups = []
    for loop in LOOPS:
        local = "trio memory channel" if loop == "trio" else "asyncio.Queue"
        variants = [
            Variant(
                "local",
                f"{local}: {n:,} tasks waiting",
                partial(m.pending_gets, "local", loop),
            ),
            Variant(
                "aioipc",
                f"aioipc.Queue: {n:,} tasks in get()",
                partial(m.pending_gets, "aioipc", loop),
            ),
        ]
        comparisons = [
            Comparison(
                "threads added by aioipc",
                "aioipc",
                "local",
                "difference",
                Target("value", "<=", 2, "threads"),
                metric="threads",
                unit="threads",
            ),
            Comparison(
                "memory added by aioipc",
                "aioipc",
                "local",
                "difference",
                Target("value", "<", 20, "MB"),
                unit="MB",
            ),
        ]
        groups.append(
            Group(
                f"{n:,} pending get(): what they add to the process",
                loop,
                "MB",
                variants,
                n,
                baseline=False,
                adaptive=False,
                comparisons=comparisons,
            )
        )
    return groups


def heartbeat_groups() -> list[Group]:
    """p99 lag of a 1 ms heartbeat task while the loop consumes at full speed."""
    return [
        Group(
            "Loop responsiveness: p99 lag of a 1 ms heartbeat while consuming at full speed",
            payload,
            "ms",
            [
                Variant(
                    loop,
                    f"await q.get() loop + heartbeat, {loop}",
                    partial(m.heartbeat, loop, payload),
                    target=Target("value", "<=", 10, "ms"),
                )
                for loop in LOOPS
            ],
            GUESSED_RATE[payload],
            baseline=False,
        )
        for payload in PAYLOADS
    ]


def all_groups() -> list[Group]:
    """Every case of the suite, in the order of the table."""
    from . import _pool  # it builds on this module

    return [
        *throughput_groups("queue"),
        *throughput_groups("pipe"),
        *fan_groups(2, 1),
        *fan_groups(4, 1),
        *fan_groups(2, 2),
        *work_sharing_groups(),
        *prefetch_groups(),
        *async_producer_groups(),
        *round_trip_groups(),
        *pending_groups(),
        *heartbeat_groups(),
        *_pool.pool_groups(),
    ]
