"""How ``pcq.map``'s failures read: the items and the user's error, no internals.

A map's task is a chunk ``[start, items]`` and a failed item surfaces inside
the worker as :class:`~pcq.stages.ChunkFailed`; neither means anything to the
caller, who passed items and wrote the function.  So a worker's log line names
the items (``item 7``, ``items 0-9``) and gives the function's own error
(``ValueError: bad item 7``), and the caller's :class:`~pcq.errors.TaskFailed`
carries the same error text, from which it rebuilds the exception.
"""

from __future__ import annotations

import traceback


def chunk_text(start: int, size: int) -> str:
    """``item 7``, or ``items 0-9`` for a chunk of ten."""
    return f"item {start}" if size == 1 else f"items {start}-{start + size - 1}"


def chunk_error(start: int, size: int, errors: dict[int, str]) -> str:
    """What failed in a chunk: the error of its first failed item, named when the
    chunk holds several, and how many others failed."""
    first = min(errors)
    if size == 1:
        return errors[first]
    more = f" (and {len(errors) - 1} more item(s))" if len(errors) > 1 else ""
    return f"item {start + first}: {errors[first]}{more}"


def chunk_traceback(exc: BaseException) -> str:
    """The traceback of the user's error behind ``exc`` (the function's frames,
    not the wrapper's), for the dead letter and the debug log."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
