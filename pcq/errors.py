"""The exceptions a pcq user can catch.

Everything pcq raises on purpose derives from :class:`PcqError`::

    PcqError
    ├── ConfigError              bad option, URL, backend name or PRODUCER/HANDLER spec
    │   └── ImportSpecError      "module:function" that cannot be imported or called
    ├── SerializationError       a task body msgpack cannot carry
    ├── DecodeError              a queue message that is not a pcq envelope
    ├── BackendUnavailable       the queue's server cannot be reached (or refused us)
    │   └── BackendLost          reached once, then gone for longer than the reconnect budget
    │       └── QueueDataLost    the server came back without the queue's data
    ├── TaskTimeout              a handler ran past its timeout (raised inside it)
    └── TaskFailed               pcq.map: an item's task failed after its retries

The CLI turns any ``PcqError`` into one line on stderr and exit code 2 (usage and
configuration), or 3 for :class:`BackendLost` (the backend went away mid-run) —
never a traceback.  Third-party errors are translated where they
are caught and chained (``raise BackendUnavailable(...) from exc``), so the
original cause is kept for debugging.
"""

from __future__ import annotations


class PcqError(Exception):
    """Root of every error pcq raises on purpose."""


class ConfigError(PcqError):
    """A setting is wrong: an option, a URL, a backend name."""


class ImportSpecError(ConfigError):
    """A ``module:function`` or ``path/file.py:function`` spec cannot be resolved."""


class SerializationError(PcqError):
    """A task body cannot be encoded; the message names the offending type.

    ``index`` is the position of the offending body in the batch being put (the
    bodies before it were put), or 0 when unknown.  ``put_many`` sets ``put``:
    how many items of its iterable were put before the offending one.
    """

    index: int = 0
    put: int | None = None

    def where(self) -> str:
        """The message with the item's position: "item 3 cannot encode ..."."""
        if self.put is None:
            return str(self)
        before = "nothing was put" if not self.put else f"the {self.put} before it were put"
        return f"item {self.put + 1}: {self}; {before}"


class DecodeError(PcqError):
    """Bytes taken from a queue are not a valid pcq envelope."""


class BackendUnavailable(PcqError):
    """The backend's server cannot be reached, or refused the connection."""


class BackendLost(BackendUnavailable):
    """The server was reached, then stayed unreachable for longer than the reconnect
    budget (``retry_for``, ``--reconnect-timeout``): the run cannot go on."""


class QueueDataLost(BackendLost):
    """The server came back without the queue's data (it restarted without
    persistence, or the data was evicted or flushed): nothing the run did can be
    trusted to be there, so no process of it may claim success."""


class TaskTimeout(PcqError):
    """A handler ran past its timeout; the attempt counts as failed."""


class TaskFailed(PcqError):
    """``pcq.map``: the task of one item failed after its retries.  Raised when
    iteration reaches that item; ``index`` is its position in the input and
    ``error`` the handler's last error (``"ExceptionType: message"``)."""

    def __init__(self, index: int, error: str) -> None:
        super().__init__(index, error)  # both in args: it pickles like any exception
        self.index = index
        self.error = error

    def __str__(self) -> str:
        return f"item {self.index} failed: {self.error}"
