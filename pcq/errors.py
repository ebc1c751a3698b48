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

import builtins


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
    iteration reaches that item.

    ``index`` is the item's position in the input; ``error`` the function's last
    error as text (``"ValueError: bad item 7"``), ``type_name`` and ``message``
    its two parts; ``exception`` the error itself, rebuilt, when its type is a
    builtin one (or pcq's :class:`TaskTimeout`), else None.  It is rebuilt from
    its type's name and message, never unpickled: a worker's output must not be
    able to run code in the caller.  It is this exception's ``__cause__`` (the
    traceback shows it), and a caller that wants ``except ValueError`` to see it
    raises it again::

        try:
            for result in pcq.map(f, items):
                ...
        except pcq.TaskFailed as failed:
            if failed.exception is None:
                raise
            raise failed.exception from failed
    """

    def __init__(self, index: int, error: str) -> None:
        super().__init__(index, error)  # both in args: it pickles like any exception
        self.index = index
        self.error = error
        self.type_name, self.message = _split_error(error)
        self.exception = _rebuilt(self.type_name, self.message)
        self.__cause__ = self.exception

    def __str__(self) -> str:
        return f"item {self.index} failed: {self.error}"


def _split_error(error: str) -> tuple[str | None, str]:
    """``"ValueError: bad"`` -> ("ValueError", "bad"); text with no type name
    before its first colon -> (None, the text)."""
    name, sep, message = error.partition(": ")
    if not sep and error.endswith(":"):  # an exception with no message
        name, sep, message = error[:-1], ":", ""
    return (name, message) if sep and name.isidentifier() else (None, error)


def _rebuilt(type_name: str | None, message: str) -> Exception | None:
    """An exception of the builtin type (or TaskTimeout) named ``type_name`` with
    ``message``; None for any other type, or one that cannot be built so."""
    kind = _REBUILDABLE.get(type_name or "")
    if kind is None:
        return None
    try:
        return kind(message)
    except Exception:  # a builtin that wants other arguments (UnicodeDecodeError)
        return None


_REBUILDABLE: dict[str, type[Exception]] = {
    name: kind for name, kind in vars(builtins).items()
    if isinstance(kind, type) and issubclass(kind, Exception)
}
_REBUILDABLE[TaskTimeout.__name__] = TaskTimeout
