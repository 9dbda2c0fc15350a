"""Async queues, pipes and worker processes over real multiprocessing: asyncio, uvloop, trio."""

from ._connection import Connection as Connection
from ._connection import ConnectionStatistics as ConnectionStatistics
from ._connection import Pipe as Pipe
from ._exceptions import BrokenResourceError as BrokenResourceError
from ._exceptions import BusyResourceError as BusyResourceError
from ._exceptions import ClosedResourceError as ClosedResourceError
from ._exceptions import Empty as Empty
from ._exceptions import Full as Full
from ._exceptions import ProcessFailed as ProcessFailed
from ._exceptions import RemoteError as RemoteError
from ._exceptions import RemoteTraceback as RemoteTraceback
from ._exceptions import ShutDown as ShutDown
from ._exceptions import WorkerDied as WorkerDied
from ._listener import InsecureListenerWarning as InsecureListenerWarning
from ._listener import Listener as Listener
from ._listener import ListenerStatistics as ListenerStatistics
from ._listener import connect as connect
from ._listener import listen as listen
from ._mpqueue import SyncQueue as SyncQueue
from ._pool import Pool as Pool
from ._pool import PoolMap as PoolMap
from ._pool import open_pool as open_pool
from ._process import Process as Process
from ._process import open_process as open_process
from ._queue import JoinableQueue as JoinableQueue
from ._queue import Queue as Queue
from ._queue import QueueStatistics as QueueStatistics

__all__ = [
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "Connection",
    "ConnectionStatistics",
    "Empty",
    "Full",
    "InsecureListenerWarning",
    "JoinableQueue",
    "Listener",
    "ListenerStatistics",
    "Pipe",
    "Pool",
    "PoolMap",
    "Process",
    "ProcessFailed",
    "Queue",
    "QueueStatistics",
    "RemoteError",
    "RemoteTraceback",
    "ShutDown",
    "SyncQueue",
    "WorkerDied",
    "connect",
    "listen",
    "open_pool",
    "open_process",
]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
