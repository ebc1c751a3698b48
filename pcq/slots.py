"""The consume loop: where a task's life in a consumer is decided, at every
concurrency.

A consumer (:class:`pcq.roles.Consumer`) keeps up to C = ``concurrency`` tasks
running.  At C == 1 they run one after another in its main thread
(:class:`~pcq.runners.InlineRunner`); at C > 1 a plain handler runs in C threads,
an ``async def`` one as asyncio tasks (see :mod:`pcq.runners`, which also says
how each runner enforces a timeout).  The main thread alone talks to the queue
(take, ack, reap), so a backend never sees two calls at once, and it alone
decides what became of a task.

One task's life, step by step, and where each step is decided:

1. **Take** (:meth:`Slots.run`): while slots are free, take a lease sized to
   them (at C == 1, as many tasks as fit ``TARGET_BATCH_SECONDS`` of handler
   work, growing from 1: slow start).  A backend may hand out more; those wait
   in a backlog, unstarted.  A backend whose ``multiple_leases`` is False holds
   one lease at a time.  A lease of a *suspect* (``Lease.deaths`` > 0: it was in
   flight in a consumer that died) runs where no other task runs: it starts once
   nothing else runs here, and nothing else is taken until it is acknowledged,
   so a task that kills its process takes no innocent task with it.  At
   concurrency 1, while a lease runs for at most ``READ_AHEAD_SECONDS``, the
   backend may take the next one ahead (``Queue.read_ahead``; the local
   backend does): it counts as in flight, a death counts none against it (never
   started) and a suspect is never taken ahead, so isolation costs nothing.
2. **Poison** (:meth:`Slots._add`): a lease whose consumers died
   ``max_deliveries`` times is dead-lettered unrun (:func:`~pcq.backends.base.poisoned`).
3. **Run** (:meth:`Slots._start_backlog`): backlog tasks start while slots are
   free.  A task that raises, or runs past its timeout (:mod:`pcq.runners`),
   is a failed attempt: the consumer's ``failed`` decides retry (with backoff)
   or dead letter (:meth:`pcq.roles.Consumer.failure`).
4. **Ack** (:meth:`Slots._settle`): a lease is acknowledged, with its failures
   and a stage's outputs, once all its tasks have finished (Redis's ack accepts
   leases out of order).  When it is the only lease open and the consumer goes
   on, the ack takes the next lease in the same round trip (``ack_and_take``).
5. **Stay for a retry** (:meth:`Slots._settle`): a sentinel that came while a
   task here was still running is not obeyed if that task's retry is pending:
   the consumer stays, and the queue hands it a sentinel again once the run is
   over.
6. **Give back** (:meth:`Slots._hand_back`): on a stop request the backlog goes
   back to the queue unstarted, the running tasks finish (the supervisor's grace
   period bounds that), leases are acknowledged and the loop returns.  A task is
   in the queue's in-flight set from take to ack, so a process killed at any
   point loses none.
7. **Outputs** (a stage): what a task returned — a list of outputs — is kept
   with its lease and put on the next queue by that lease's ack; a failed task
   contributes only what its consumer's ``failed`` gives (pcq.map's results).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any

from pcq.backends.base import MAX_BATCH, TARGET_BATCH_SECONDS, Failure, Lease, Queue, poisoned
from pcq.envelope import Batch, Envelope
from pcq.runners import (
    AsyncRunner,
    Finished,
    InlineRunner,
    Runner,
    ThreadRunner,
    expired,
    with_outputs,
)
from pcq.settings import IDLE_WAIT, StageSettings

#: At concurrency 1, the longest a lease may run (measured) for the next one to
#: be taken while it runs (``Queue.read_ahead``).
READ_AHEAD_SECONDS = 0.1

#: Longest the main thread waits for a task to finish before it looks again for
#: new tasks (when slots are free), stop requests and timeouts.
POLL = 0.02


@dataclass(frozen=True)
class Handling:
    """What the loop asks of its consumer (:meth:`pcq.roles.Consumer.handling`)."""

    #: Runs one task's body.
    call: Callable[[Any], Any]
    is_async: bool
    #: A failed attempt at ``batch``'s task ``index``: its Failure (retry or dead
    #: letter) and the outputs it still gives (pcq.map's results of a dead chunk).
    failed: Callable[[Batch, int, BaseException], tuple[Failure, list[Any]]]
    #: Acknowledge a lease (failures, give_back, outputs); with ``take`` > 0, take
    #: the next lease of up to ``take`` tasks in the same round trip and return it.
    settle: Callable[[Lease, list[Failure], list[Envelope], list[Any], int], Lease | None]
    #: The consumer's tally of an acknowledged lease: (handled, failures).
    count: Callable[[int, list[Failure]], None]
    stopping: Callable[[], bool]
    #: A stage's: the list of outputs a result of ``call`` gives, made within
    #: its task (:func:`~pcq.runners.with_outputs`).  None: nothing is kept.
    expand: Callable[[Any], list[Any]] | None = None
    #: Told which task runs inline ('' : none), for a supervisor's timeout kill.
    mark: Callable[[str], None] | None = None


@dataclass(slots=True)
class _Open:
    """A lease taken and not yet acknowledged."""

    lease: Lease
    left: int  # tasks not finished yet (neither handled nor handed back)
    handled: int = 0
    busy: float = 0.0  # handler seconds, summed
    failures: list[Failure] = field(default_factory=list)
    give_back: list[Envelope] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)  # a stage's, of its finished tasks
    poison: bool = False
    batch: int = 0  # the next task to start: lease.batches[batch].bodies[index]
    index: int = 0


class Slots:
    """The consume loop of one consumer (see the module docstring)."""

    def __init__(self, queue: Queue, handling: Handling, settings: StageSettings,
                 runner: InlineRunner | Runner, finished: SimpleQueue[Finished]) -> None:
        self.queue = queue
        self.slots = settings.concurrency
        self._h = handling
        self._timeout = settings.timeout
        self._max_deliveries = settings.max_deliveries
        self._inline = runner if isinstance(runner, InlineRunner) else None
        self._runner = None if isinstance(runner, InlineRunner) else runner
        self._finished = finished
        self._open: dict[int, _Open] = {}  # lease number -> lease
        self._backlog: deque[int] = deque()  # leases with tasks not started yet
        self._queued = 0  # tasks not started yet
        self._running: dict[int, tuple[int, Batch, int]] = {}  # key -> (lease, batch, index)
        self._leases = 0
        self._keys = 0
        self._batch = 1  # tasks per take at concurrency 1 (slow start)
        self._sentinel = False
        self._suspect: int | None = None  # the open lease of a suspect task

    def run(self) -> None:
        queue = self.queue
        next_reap = time.monotonic() + queue.reap_interval
        while True:
            self._start_backlog()
            stopping = self._h.stopping()
            if stopping and self._backlog:
                self._hand_back()
            lease = self._settle()
            if lease is not None:
                self._add(lease)
                continue
            if (self._sentinel or stopping) and not self._running and not self._open:
                return
            if not self._may_take(stopping):
                self._collect(POLL if self._running else 0.0)
                continue
            lease = queue.take(self._want(), timeout=POLL if self._running else IDLE_WAIT)
            if lease is not None:
                self._add(lease)
            elif not self._running and time.monotonic() >= next_reap:
                queue.reap()
                next_reap = time.monotonic() + queue.reap_interval
            self._collect(0.0)

    def _may_take(self, stopping: bool) -> bool:
        free = self.slots - len(self._running) - self._queued
        return (free > 0 and not self._sentinel and not stopping and self._suspect is None
                and (self.queue.multiple_leases or not self._open))

    def _want(self) -> int:
        if self.slots == 1:
            return self._batch
        return self.slots - len(self._running) - self._queued

    def _add(self, lease: Lease) -> None:
        self._leases += 1
        number = self._leases
        if lease.sentinel is not None:
            self._sentinel = True
        size = lease.size
        poison = poisoned(lease, self._max_deliveries)
        if poison:  # a task that killed its consumers: dead-lettered, never run again
            self._open[number] = _Open(lease, 0, size, failures=poison, poison=True)
            return
        if lease.deaths:
            self._suspect = number
        self._open[number] = _Open(lease, size)
        if size:
            self._backlog.append(number)
            self._queued += size

    def _start_backlog(self) -> None:
        backlog = self._backlog
        while backlog and len(self._running) < self.slots:
            number = backlog[0]
            if number == self._suspect and self._running:
                return  # a suspect starts once nothing else runs here
            entry = self._open[number]
            if self._inline is not None:
                if not self._run_inline(entry):
                    return  # a stop came before the first task
                continue
            batches = entry.lease.batches
            batch, index = batches[entry.batch], entry.index
            entry.index += 1
            if entry.index == len(batch.bodies):
                entry.batch, entry.index = entry.batch + 1, 0
                if entry.batch == len(batches):
                    backlog.popleft()
            self._queued -= 1
            self._keys += 1
            self._running[self._keys] = (number, batch, index)
            assert self._runner is not None
            self._runner.submit(self._keys, batch.bodies[index])

    def _run_inline(self, entry: _Open) -> bool:
        """Run the lease's tasks not started yet in this thread, until a stop;
        False if none ran."""
        assert self._inline is not None
        outputs = entry.outputs if self._h.expand is not None else None
        began = time.perf_counter()
        entry.batch, entry.index, ran, failures = self._inline.run_lease(
            entry.lease.batches, entry.batch, entry.index, self._h.stopping, outputs)
        entry.busy += time.perf_counter() - began
        entry.left -= ran
        entry.handled += ran
        self._queued -= ran
        for batch, index, error in failures:
            self._fail(entry, batch, index, error)
        if entry.batch == len(entry.lease.batches):
            self._backlog.popleft()
        return ran > 0

    def _fail(self, entry: _Open, batch: Batch, index: int, error: BaseException) -> None:
        failure, outputs = self._h.failed(batch, index, error)
        entry.failures.append(failure)
        entry.outputs.extend(outputs)

    def _hand_back(self) -> None:
        while self._backlog:
            entry = self._open[self._backlog.popleft()]
            batches = entry.lease.batches
            for k in range(entry.batch, len(batches)):
                batch = batches[k]
                start = entry.index if k == entry.batch else 0
                entry.give_back.extend(batch.envelope(i) for i in range(start, len(batch.bodies)))
                entry.left -= len(batch.bodies) - start
        self._queued = 0

    def _collect(self, wait: float) -> None:
        """Record the tasks that finish within ``wait`` seconds (those already
        finished at least), then count the overdue ones failed."""
        if self._runner is None:
            return  # inline: every task has finished when its batch returns
        wait = min(wait, self._until_overdue())
        try:
            done = [self._finished.get(timeout=wait) if wait > 0 else self._finished.get_nowait()]
        except Empty:
            done = []
        with contextlib.suppress(Empty):
            while True:
                done.append(self._finished.get_nowait())
        for key, error, seconds, result in done:
            self._finish(key, error, seconds, result)
        if self._timeout is not None:
            self._expire()

    def _finish(
        self, key: int, error: BaseException | None, seconds: float, result: Any = None
    ) -> None:
        assert self._runner is not None
        task = self._running.pop(key, None)
        self._runner.started.pop(key, None)
        if task is None:
            return  # abandoned after its timeout: already counted
        number, batch, index = task
        entry = self._open[number]
        entry.left -= 1
        entry.handled += 1
        entry.busy += seconds
        if error is not None:
            self._fail(entry, batch, index, error)
        elif self._h.expand is not None:
            entry.outputs.extend(result)

    def _until_overdue(self) -> float:
        assert self._runner is not None
        if self._timeout is None or not self._runner.started:
            return IDLE_WAIT
        limit = self._timeout + self._runner.slack
        started = self._runner.started
        first = min(started.get(key, time.monotonic()) for key in self._running)
        return max(0.0, first + limit - time.monotonic())

    def _expire(self) -> None:
        assert self._timeout is not None and self._runner is not None
        limit = self._timeout + self._runner.slack
        now = time.monotonic()
        started = self._runner.started
        for key in [k for k in self._running if now - started.get(k, now) >= limit]:
            self._runner.abandon(key)
            self._finish(key, expired(self._timeout), now - started[key])

    def _settle(self) -> Lease | None:
        """Acknowledge every lease whose tasks have all finished; the next lease
        when the last ack took it in the same round trip."""
        for number in [n for n, entry in self._open.items() if entry.left == 0]:
            entry = self._open.pop(number)
            if number == self._suspect:
                self._suspect = None
            if self._sentinel and any(f.retry_in is not None for f in entry.failures):
                # The sentinel came while this task was still running here (the
                # queue hands it out once only our tasks are in flight); its retry
                # is due later, so stay for it: the queue gives a sentinel again
                # once the run is over.
                self._sentinel = False
            self._note_cost(entry)
            alone = not (self._open or self._running or self._backlog or self._sentinel)
            take = self._want() if alone and not self._h.stopping() else 0
            lease = self._h.settle(entry.lease, entry.failures, entry.give_back,
                                   entry.outputs, take)
            self._h.count(entry.handled, entry.failures)  # after the ack: it may be stale
            if lease is not None:
                return lease
        return None

    def _note_cost(self, entry: _Open) -> None:
        """Report what a task costs here (producers size batches by it) and, at
        concurrency 1, size the next take to about TARGET_BATCH_SECONDS of work."""
        if not entry.handled or entry.poison:
            return
        # Never more than a batch's worth per slot: a batch of up to ``slots``
        # tasks runs at once here, so it spreads work as well as single tasks do.
        cost = entry.busy / entry.handled
        self.queue.note_task_cost(min(cost, TARGET_BATCH_SECONDS) / self.slots)
        if self.slots == 1:
            fit = int(TARGET_BATCH_SECONDS / cost) if cost > 0 else MAX_BATCH
            self._batch = max(1, min(MAX_BATCH, self._batch * 2, fit))
            # One lease ahead saves the round trip between leases; it can cost a
            # run's tail the work of one lease another consumer could have done.
            self.queue.read_ahead(cost * self._batch <= READ_AHEAD_SECONDS)


def consume(queue: Queue, handling: Handling, settings: StageSettings) -> None:
    """Consume until a sentinel or a stop, up to ``settings.concurrency`` tasks at
    once, with the runner that concurrency and handler need."""
    finished: SimpleQueue[Finished] = SimpleQueue()
    runner: InlineRunner | Runner
    call = handling.call
    if settings.concurrency == 1:  # it makes a stage's outputs within each task itself
        runner = InlineRunner(call, is_async=handling.is_async, timeout=settings.timeout,
                              mark=handling.mark, expand=handling.expand)
    else:
        if handling.expand is not None:  # a task's outputs are made in its thread or task
            call = with_outputs(call, handling.expand, handling.is_async)
        if handling.is_async:
            runner = AsyncRunner(call, settings.timeout, finished)
        else:
            runner = ThreadRunner(call, settings.concurrency, finished)
    try:
        Slots(queue, handling, settings, runner, finished).run()
    finally:
        runner.close()
