"""Stages: consumers whose handlers produce the tasks of the next queue.

A :class:`Stage` is a :class:`~pcq.roles.Consumer` with a target queue ``to``.
What its handler gives for a task becomes tasks of ``to``: a plain function's
return value is one output (``None`` included), a generator's yields are zero or
more (so a stage can filter and fan out).  One mechanism carries them, at every
concurrency: each task's result becomes its list of outputs within the task
(:func:`as_outputs`, which :meth:`Stage._task` names), the consume loop
(:mod:`pcq.slots`) keeps that list with the task's lease — only for a task that
succeeded, within its timeout — and the lease's ack
(:meth:`Stage._settle`) puts them on ``to`` by the same atomic step that
acknowledges the lease (``Queue.ack(..., outputs=, to=)``).  So each task's
outputs reach the next queue exactly once, while the handler itself still runs
at least once.

Close propagation, counted by acknowledged work: the output queue of a stage
closes when its input queue is closed and nothing of it is pending (every task
acknowledged: done or dead).  No end markers travel in band — a marker per
upstream worker breaks when a task is redelivered — so the check is simply
made by whoever may be the last to see it true: every stage consumer when it
leaves at its sentinel (after its own last ack), and the supervising process
(``pcq run``, ``pcq consume --to``) whenever a consumer exits and at the end.
``close`` is idempotent, so several of them seeing it true is harmless.  A
consumer killed with tasks in flight leaves them pending, so no one closes the
output early; they are redelivered to a survivor or to the replacement the
supervisor starts, and the last of those to finish closes it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from pcq.backends.base import Failure, Lease, Queue
from pcq.envelope import PLAIN, Batch, Envelope, check_encodable, pack_value
from pcq.errors import ConfigError, SerializationError
from pcq.map_text import chunk_error, chunk_text, chunk_traceback
from pcq.roles import Consumer
from pcq.settings import IDLE_WAIT


def finished(q: Queue) -> bool:
    """``q``'s run is finished: closed, and every task acknowledged."""
    c = q.counters()
    return c.closed and c.pending <= 0


def close_if_finished(source: Queue, to: Queue) -> bool:
    """Close ``to`` if the stage reading ``source`` cannot produce any more:
    ``source``'s run is finished.  True when that holds."""
    if finished(source):
        to.close()
        return True
    return False


def outputs_of(result: Any) -> list[Any]:
    """A handler's outputs: a generator's yields, else the return value itself."""
    if isinstance(result, types.GeneratorType):
        return list(result)
    return [result]


def _check(outputs: list[Any]) -> None:
    """SerializationError unless every output can travel; plain values are
    recognised by type, so a stage of small values pays no trial encoding."""
    for value in outputs:
        kind = type(value)
        if kind in PLAIN or (kind is int and -(2**63) <= value < 2**64):
            continue
        check_encodable(outputs)
        return


class Stage(Consumer):
    """A consumer that puts what ``handle`` gives on queue ``to`` (see the module
    docstring); the other arguments are :class:`~pcq.roles.Consumer`'s.

    Each task's result becomes its list of outputs (:func:`as_outputs`) inside
    the task — a generator is run to its end there (and within its timeout),
    and every output is checked to travel: either failure is the task's.  The
    consume loop keeps a task's list with its lease and hands them to
    :meth:`_settle`, which puts them with the lease's ack: one mechanism at
    every concurrency."""

    def __init__(
        self,
        queue: Queue,
        handle: Callable[[Any], Any] | None = None,
        *,
        to: Queue,
        **options: Any,
    ) -> None:
        super().__init__(queue, handle, **options)
        queue._check_target(to)
        self.to = to

    def _task(self) -> tuple[Callable[[Any], Any], Callable[[Any], list[Any]] | None]:
        return self._handler(), as_outputs

    def _settle(self, lease: Lease, failures: list[Failure], give_back: list[Envelope],
                outputs: list[Any], take: int) -> Lease | None:
        if outputs and not self.queue.parks_outputs:
            # A full next queue holds this stage back, as it would a producer
            # (a backend with parks_outputs holds the ack itself).
            self.to.wait_for_room(lambda: self._stopping)
        if take:
            return self.queue.ack_and_take(lease, failures, give_back, take, IDLE_WAIT,
                                           outputs, self.to)
        self.queue.ack(lease, failures, give_back, outputs, self.to)
        return None

    def consume(self) -> None:
        # A consumer that replaces one killed between its last ack and this
        # check finds its input finished already: it closes the output too.
        close_if_finished(self.queue, self.to)
        self.queue.unpark_when(lambda: self._stopping)
        super().consume()
        if not self._stopping:  # left at its sentinel, after its last ack
            close_if_finished(self.queue, self.to)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.to.dispose()


def as_outputs(result: Any) -> list[Any]:
    """A handler's result as the list of outputs it gives: a generator's yields,
    else the value itself (``None`` included); SerializationError unless every
    output can travel."""
    kind = type(result)
    if kind in PLAIN or (kind is int and -(2**63) <= result < 2**64):  # the common case
        return [result]
    outputs = list(result) if kind is types.GeneratorType else [result]
    _check(outputs)
    return outputs


def _one(result: Any) -> list[Any]:
    return [result]


class ChunkFailed(Exception):
    """Some items of a pcq.map chunk failed: ``packed`` holds the results of all of
    them, errors included, for the caller if this was the chunk's last attempt."""

    def __init__(self, error: str, packed: bytes) -> None:
        super().__init__(error)
        self.packed = packed


class ResultStage(Stage):
    """The stage of :func:`pcq.map`.  A task is a chunk ``[start, items]``; its
    result is ``[start, values, errors]``: ``values[k]`` is the result for item
    ``start + k``, and ``errors`` (None when all succeeded) maps ``k`` to the
    error of an item that failed — so the caller learns of a failure in the same
    exactly-once handoff as of a result.  A chunk with a failed item is retried
    whole (at least once, as any task) and after its last attempt gives what
    that attempt got.  A chunk's result is packed once, here, and unpacked once
    by the caller; the results of one lease travel as one message.  One task at
    a time per worker: pcq.map's chunks are its unit of parallelism."""

    def __init__(self, queue: Queue, handle: Callable[[Any], Any] | None = None, *,
                 to: Queue, **options: Any) -> None:
        settings = options.get("settings")
        if (settings.concurrency if settings else options.get("concurrency", 1)) > 1:
            raise ConfigError("pcq.map runs one task at a time in each worker")
        super().__init__(queue, handle, to=to, **options)

    def handle(self, item: Any) -> Any:
        start, items = item
        func = self._handle or super().handle
        values: list[Any] = []
        errors: dict[int, str] = {}
        first: Exception | None = None
        results = map(func, items)  # the items' loop in C, as in a Pool worker
        while True:
            try:
                values.extend(results)  # keeps what came before an item that raised
                break
            except Exception as exc:  # item len(values) failed; the rest go on
                errors[len(values)] = f"{type(exc).__name__}: {exc}"
                values.append(None)
                first = first or exc
        try:
            packed = pack_value([start, values, errors or None])
        except SerializationError:  # find the values that cannot travel
            for k, value in enumerate(values):
                try:
                    pack_value(value)
                except SerializationError as exc:
                    values[k], errors[k] = None, str(exc)
                    first = first or exc
            packed = pack_value([start, values, errors])
        if first is not None:
            raise ChunkFailed(chunk_error(start, len(items), errors), packed) from first
        return packed  # one output

    def _task(self) -> tuple[Callable[[Any], Any], Callable[[Any], list[Any]] | None]:
        return self.handle, _one  # no generator unrolling: a chunk gives one packed result

    def task_text(self, env: Envelope) -> str:
        start, items = env.body
        return chunk_text(start, len(items))

    def dead_text(self, env: Envelope) -> str:
        return ""  # the caller's TaskFailed says it; nothing is left to list

    def _failure(self, batch: Batch, index: int, exc: BaseException) -> Failure:
        if isinstance(exc, ChunkFailed):  # the user's error, not the wrapper's name
            return self.failure(batch.envelope(index), str(exc), chunk_traceback(exc))
        return super()._failure(batch, index, exc)

    def _failed(self, batch: Batch, index: int, exc: BaseException) -> tuple[Failure, list[Any]]:
        failure = self._failure(batch, index, exc)
        if failure.retry_in is not None:
            return failure, []
        if isinstance(exc, ChunkFailed):  # its last attempt: the caller gets what it got
            return failure, [exc.packed]
        # The chunk as a whole failed (its timeout, a malformed task).
        start, items = batch.bodies[index]
        errors = dict.fromkeys(range(len(items)), failure.error)
        return failure, [pack_value([start, [None] * len(items), errors])]

    def _settle(self, lease: Lease, failures: list[Failure], give_back: list[Envelope],
                outputs: list[Any], take: int) -> Lease | None:
        # The results of one lease travel as one message (one output).
        return super()._settle(lease, failures, give_back, [outputs] if outputs else [], take)
