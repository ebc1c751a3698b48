"""Stages: consumers whose handlers produce the tasks of the next queue.

A :class:`Stage` is a :class:`~pcq.roles.Consumer` with a target queue ``to``.
What its handler gives for a task becomes tasks of ``to``: a plain function's
return value is one output (``None`` included), a generator's yields are zero or
more (so a stage can filter and fan out).  A lease's outputs are put on ``to``
by the same atomic step that acknowledges the lease (``Queue.ack(...,
outputs=, to=)``), so each task's outputs reach the next queue exactly once,
while the handler itself still runs at least once.

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

import inspect
import types
from collections.abc import Callable, Coroutine
from typing import Any

from pcq.backends.base import Failure, Lease, Queue
from pcq.envelope import Batch, Envelope, check_encodable, pack_value
from pcq.errors import ConfigError, SerializationError
from pcq.map_text import chunk_error, chunk_text, chunk_traceback
from pcq.roles import IDLE_WAIT, Consumer
from pcq.slots import AckOutputs


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


#: Types msgpack always encodes (an int only within 64 bits): no need to try.
_PLAIN = frozenset({type(None), bool, float, str, bytes})


def _check(outputs: list[Any]) -> None:
    """SerializationError unless every output can travel; plain values are
    recognised by type, so a stage of small values pays no trial encoding."""
    for value in outputs:
        kind = type(value)
        if kind in _PLAIN or (kind is int and -(2**63) <= value < 2**64):
            continue
        check_encodable(outputs)
        return


class _Outputs(list[Any]):
    """A generator's yields: zero or more outputs (any other value is one)."""


class Stage(Consumer):
    """A consumer that puts what ``handle`` gives on queue ``to`` (see the module
    docstring); the other arguments are :class:`~pcq.roles.Consumer`'s."""

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
        self._outputs: list[Any] = []
        # handle() keeps a task's outputs itself, but with a timeout they are
        # kept only once the task's timer has stopped (a late timeout would
        # otherwise fail a task whose outputs were kept): through _handled.
        if self.timeout:
            self._handled = self._keep  # type: ignore[method-assign]

    def handle(self, item: Any) -> Any:
        # Run a generator to its end inside the task (and its timeout), and make
        # sure every output can be encoded: either failure is the task's.
        result = self._handle(item) if self._handle is not None else super().handle(item)
        kind = type(result)
        if kind in _PLAIN or (kind is int and -(2**63) <= result < 2**64):  # the common case
            if not self.timeout:
                self._outputs.append(result)
            return result
        if kind is types.CoroutineType:  # an async def handler: the loop awaits this
            return self._after(result)
        outputs = self._outputs_of(result)
        if not self.timeout:
            self._keep(outputs)
        return outputs

    def _is_async(self) -> bool:
        # Consumer asks handle(); this handle() is plain, what it calls may not be.
        fn = self._handle
        return fn is not None and (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)))  # noqa: B004 - the method, not callable()

    async def _after(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        outputs = self._outputs_of(await coroutine)
        if not self.timeout:
            self._keep(outputs)
        return outputs

    @staticmethod
    def _outputs_of(result: Any) -> Any:
        """``result``, checked it can travel; a generator's yields as _Outputs."""
        if isinstance(result, types.GeneratorType):
            outputs = _Outputs(result)
            _check(outputs)
            return outputs
        kind = type(result)
        if kind not in _PLAIN and (kind is not int or not -(2**63) <= result < 2**64):
            check_encodable([result])
        return result

    def _keep(self, result: Any) -> None:
        if type(result) is _Outputs:
            self._outputs.extend(result)
        else:
            self._outputs.append(result)

    def _concurrent_task(self) -> tuple[Callable[[Any], Any], AckOutputs | None]:
        # Many tasks at once (pcq.slots): each task returns its own outputs, as
        # a list, and the slots keep them with the task's lease until its ack;
        # nothing is kept on self, which the slot threads share.
        fn = self.handle if type(self).handle is not Stage.handle else self._handle
        if fn is None:
            return super().handle, self._ack_outputs  # raises NotImplementedError
        handler = fn
        if self._is_async():

            async def task_async(item: Any) -> list[Any]:
                return self._as_list(await handler(item))

            return task_async, self._ack_outputs

        def task(item: Any) -> list[Any]:
            return self._as_list(handler(item))

        return task, self._ack_outputs

    def _as_list(self, result: Any) -> list[Any]:
        outputs = self._outputs_of(result)
        return outputs if type(outputs) is _Outputs else [outputs]

    def _ack_outputs(self, lease: Lease, failures: list[Failure], give_back: list[Envelope],
                     outputs: list[Any]) -> None:
        if outputs:  # a full next queue holds this stage back, as it would a producer
            self.to.wait_for_room(lambda: self._stopping)
        self.queue.ack(lease, failures, give_back, outputs, self.to)

    def _take_outputs(self) -> list[Any]:
        outputs, self._outputs = self._outputs, []
        if outputs:  # a full next queue holds this stage back, as it would a producer
            self.to.wait_for_room(lambda: self._stopping)
        return outputs

    def _ack(self, lease: Lease, failures: list[Failure], give_back: list[Envelope]) -> None:
        self.queue.ack(lease, failures, give_back, self._take_outputs(), self.to)

    def _ack_and_take(
        self, lease: Lease, failures: list[Failure], give_back: list[Envelope], want: int
    ) -> Lease | None:
        outputs = self._take_outputs()
        return self.queue.ack_and_take(lease, failures, give_back, want, IDLE_WAIT,
                                       outputs, self.to)

    def consume(self) -> None:
        # A consumer that replaces one killed between its last ack and this
        # check finds its input finished already: it closes the output too.
        close_if_finished(self.queue, self.to)
        super().consume()
        if not self._stopping:  # left at its sentinel, after its last ack
            close_if_finished(self.queue, self.to)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.to.dispose()


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
    a time per worker (its outputs are kept on the consumer)."""

    def __init__(self, queue: Queue, handle: Callable[[Any], Any] | None = None, *,
                 to: Queue, **options: Any) -> None:
        if options.get("concurrency", 1) > 1:
            raise ConfigError("pcq.map runs one task at a time in each worker")
        super().__init__(queue, handle, to=to, **options)

    def handle(self, item: Any) -> Any:
        start, items = item
        func = self._handle or super(Stage, self).handle  # no generator unrolling here
        values: list[Any] = []
        keep = values.append
        errors: dict[int, str] = {}
        first: Exception | None = None
        for k, body in enumerate(items):
            try:
                keep(func(body))
            except Exception as exc:
                keep(None)
                errors[k] = f"{type(exc).__name__}: {exc}"
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
        if not self.timeout:
            self._keep(packed)
        return packed  # one output

    def task_text(self, env: Envelope) -> str:
        start, items = env.body
        return chunk_text(start, len(items))

    def dead_text(self, env: Envelope) -> str:
        return ""  # the caller's TaskFailed says it; nothing is left to list

    def _failure(self, batch: Batch, index: int, exc: BaseException) -> Failure:
        if isinstance(exc, ChunkFailed):  # the user's error, not the wrapper's name
            failure = self.failure(batch.envelope(index), str(exc), chunk_traceback(exc))
        else:
            failure = super()._failure(batch, index, exc)
        if failure.retry_in is None:
            if isinstance(exc, ChunkFailed):
                self._outputs.append(exc.packed)
            else:  # the chunk as a whole failed (its timeout, a malformed task)
                start, items = batch.bodies[index]
                errors = dict.fromkeys(range(len(items)), failure.error)
                self._outputs.append(pack_value([start, [None] * len(items), errors]))
        return failure

    def _take_outputs(self) -> list[Any]:
        results = super()._take_outputs()
        return [results] if results else []
