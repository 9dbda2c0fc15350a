"""Async queues, pipes and worker processes over real multiprocessing, for asyncio, uvloop and trio."""

from ._exceptions import BrokenResourceError as BrokenResourceError
from ._exceptions import ClosedResourceError as ClosedResourceError
from ._exceptions import Empty as Empty
from ._exceptions import Full as Full
from ._exceptions import ShutDown as ShutDown
from ._mpqueue import SyncQueue as SyncQueue
from ._queue import JoinableQueue as JoinableQueue
from ._queue import Queue as Queue
from ._queue import QueueStatistics as QueueStatistics

__all__ = [
    "BrokenResourceError",
    "ClosedResourceError",
    "Empty",
    "Full",
    "JoinableQueue",
    "Queue",
    "QueueStatistics",
    "ShutDown",
    "SyncQueue",
]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
