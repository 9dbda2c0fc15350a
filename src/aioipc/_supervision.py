"""Supervision of the processes that feed a queue (``Queue.link``).

When every producer linked to a queue has exited, the watcher thread (:mod:`._process`) ends the
queue's stream with an end marker: it travels behind every item the producers wrote, so each
reader, in any process, hands out those items first, then ends: as after ``shutdown()`` if every
producer exited with code 0, else with :class:`aioipc.BrokenResourceError` naming the failed ones.

A producer killed inside ``put`` may leave the queue's write lock taken. The queue records who
holds it, so after each exit the watcher asks the queue to give back the locks of dead holders
that were between two items; if the producer died in the middle of writing an item, the stream is
cut and cannot be repaired: the getters of this process are ended at once (and every process's
getters raise once they find the dead holder).

Supervision talks to the queue only through :class:`Supervised`, a handful of named operations
the queue module provides.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from multiprocessing.process import BaseProcess
from typing import Protocol

from . import _fork
from ._exceptions import BrokenResourceError, ShutDown
from ._process import Watch, describe_exit, watcher

__all__ = ["Supervised", "link_producers"]


class Supervised(Protocol):
    """What supervision may do to a queue. Called from the watcher thread."""

    @property
    def closed(self) -> bool:
        """True once the queue is closed in this process, or gone."""

    @property
    def is_shutdown(self) -> bool:
        """True once ``shutdown()`` was called, in any process."""

    def recover(self) -> bool:
        """Give back the locks held by dead processes that were between two items; False if one
        died in the middle of an item (the stream is cut). Decided by process state, never by how
        long a lock was held: a slow or stopped producer keeps its lock. May raise OSError or
        ValueError if the queue was closed meanwhile."""

    def end_here(self, error: BaseException) -> None:
        """End this process's getters with ``error`` at once."""

    def end_stream(self, error: BaseException) -> None:
        """Append an end marker behind every item queued: each getter, in every process, gets
        those items, then ``error``."""


class _QueueLink:
    """The producers linked to one queue in this process, and what their exits do to it.

    Every exit starts a check of the queue's locks (a producer killed inside ``put`` may leave the
    state or write lock taken); once the check passes and no linked producer runs any more, the
    end marker goes into the queue. All of it runs in the watcher thread.
    """

    def __init__(self, queue: Supervised) -> None:
        self._queue = weakref.ref(queue)
        self._lock = threading.Lock()
        self._running = 0
        self._exits: list[str] = []
        self._failed: list[str] = []
        self._checking = False
        self._ended = False

    def add(self, process: BaseProcess) -> None:
        with self._lock:
            self._running += 1
        watcher.watch(process, self._exited)

    def _exited(self, watch: Watch, code: int | None) -> None:
        with self._lock:
            self._running -= 1
            self._exits.append(describe_exit(watch.name, watch.pid, code))
            if code != 0:
                self._failed.append(describe_exit(watch.name, watch.pid, code))
            if self._checking:
                return
            self._checking = True
        watcher.add_job(self._step)

    def _step(self) -> bool:
        """One round of the check that follows an exit; True when it is over."""
        queue = self._queue()
        if queue is None or queue.closed or self._ended:
            return self._done()
        try:
            whole = queue.recover()
        except (OSError, ValueError):  # the queue was closed in this process meanwhile
            return self._done()
        with self._lock:
            last = self._running == 0
            exits = "; ".join(self._exits)
            failed = list(self._failed)
            total = len(self._exits)
        if not whole:
            self._ended = True
            queue.end_here(
                BrokenResourceError(
                    "a producer died in the middle of putting an item into the queue, which cut "
                    f"the queue's stream: no process can get from it any more ({exits})"
                )
            )
        elif last and not queue.is_shutdown:  # after a shutdown, getters end with ShutDown
            self._ended = True
            end: BaseException
            if failed:
                end = BrokenResourceError(
                    f"{len(failed)} of the {total} producers linked to the queue failed: "
                    + "; ".join(failed)
                )
            else:  # every producer finished its work: the stream ends as after shutdown()
                end = ShutDown()
            queue.end_stream(end)
        return self._done()

    def _done(self) -> bool:
        with self._lock:
            self._checking = False
        return True


_links: weakref.WeakKeyDictionary[Supervised, _QueueLink] = weakref.WeakKeyDictionary()
_links_lock = threading.Lock()


def link_producers(queue: Supervised, producers: Iterable[BaseProcess]) -> None:
    """Supervise ``producers`` as the processes that put items into ``queue`` (``Queue.link``)."""
    producers = list(producers)
    for process in producers:
        if not isinstance(process, BaseProcess):
            raise TypeError(f"expected a multiprocessing process, not {type(process).__name__}")
        if process.pid is None:
            raise ValueError(f"{process!r} has not been started: link it once it runs")
    with _links_lock:
        link = _links.get(queue)
        if link is None:
            link = _links[queue] = _QueueLink(queue)
    for process in producers:
        link.add(process)


def _after_fork_in_child() -> None:
    # Supervision belongs to the process that started the producers.
    global _links_lock
    _links.clear()
    _links_lock = threading.Lock()


_fork.register(_after_fork_in_child)
