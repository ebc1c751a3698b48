"""pcq: producer -> many-consumer work, on one machine or across many.

    summary = pcq.run(produce, handle, workers=16, maxsize=16)
    summary = pcq.run(produce, fetch, parse, save, workers=[16, 4, 1])   # a pipeline
    for result in pcq.map(func, items, workers=8): ...

or, class style, ``pcq.Producer`` / ``pcq.Consumer`` processes sharing a queue
from ``pcq.open_queue("local", maxsize=16)``.
"""

from importlib.metadata import PackageNotFoundError, version

from pcq.backends import open_queue
from pcq.backends.base import Queue
from pcq.errors import (
    BackendLost,
    BackendUnavailable,
    ConfigError,
    DecodeError,
    ImportSpecError,
    PcqError,
    QueueDataLost,
    SerializationError,
    TaskFailed,
    TaskTimeout,
)
from pcq.joinable import JoinableQueue
from pcq.mapping import map
from pcq.roles import Consumer, Producer
from pcq.run import run
from pcq.stages import Stage
from pcq.summary import Summary

try:
    __version__ = version("pcq")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BackendLost",
    "BackendUnavailable",
    "ConfigError",
    "Consumer",
    "DecodeError",
    "ImportSpecError",
    "JoinableQueue",
    "PcqError",
    "Producer",
    "Queue",
    "QueueDataLost",
    "SerializationError",
    "Stage",
    "Summary",
    "TaskFailed",
    "TaskTimeout",
    "__version__",
    "map",
    "open_queue",
    "run",
]
